"""Errors raised by jaxcnmf.

Every error a user can trigger with bad input is a `JaxcnmfError`, a `ValueError` subclass, raised before heavy work
and naming the file or argument, what is wrong, and what to do about it.
"""

from __future__ import annotations


class JaxcnmfError(ValueError):
    """Base class of every error jaxcnmf raises about its inputs."""


class MovieError(JaxcnmfError):
    """A movie file or array cannot be used: missing, unreadable, wrong shape, too short, or non-finite values."""


class ResultFileError(JaxcnmfError):
    """A result file cannot be written or read back."""


class ParameterError(JaxcnmfError):
    """A parameter is out of its valid range or inconsistent with the data."""


class TraceError(JaxcnmfError):
    """A trace (or a file of traces) cannot be deconvolved as given."""
