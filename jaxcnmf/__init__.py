"""jaxcnmf: constrained non-negative matrix factorisation (CNMF) of calcium-imaging movies, in JAX.

The movie Y (pixels x frames) is modelled as A C + b f + noise. Public names are imported lazily from the module that
holds them, so `import jaxcnmf` stays cheap and each stage can be used on its own.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import JaxcnmfError, MovieError, ParameterError, ResultFileError, TraceError
from .result import Result

# public name -> module that defines it
_LAZY = {
    # movie and result I/O
    "open_movie": "io",
    "load_movie": "io",
    "save_movie": "io",
    "save_result": "io",
    "load_result": "io",
    "MovieSource": "io",
    # ground truth
    "simulate": "sim",
    "SimParams": "sim",
    "Truth": "sim",
    "load_truth": "sim",
    "save_truth": "sim",
    # scoring
    "match_footprints": "metrics",
    "score_result": "metrics",
    "load_regions": "metrics",
    # temporal core
    "estimate_noise": "noise",
    "estimate_noise_movie": "noise",
    "estimate_ar": "noise",
    "ar_to_tau": "noise",
    "tau_to_ar": "noise",
    "deconvolve": "deconv",
    "DeconvResult": "deconv",
    "deconvolve_batch": "deconv",
    "deconvolve_rows": "deconv",
    # fit stages: initialisation, spatial update, quality
    "greedy_init": "init",
    "sparse_nmf_init": "init",
    "InitResult": "init",
    "dendrite_init": "dendrites",
    "update_spatial": "spatial",
    "search_areas": "spatial",
    "cleanup_footprints": "spatial",
    "evaluate_components": "quality",
    "Quality": "quality",
    # the full fit
    "fit": "fit",
    "Params": "fit",
    # scale: patches, many movies
    "fit_patches": "patches",
    "fit_many": "batch",
    "update_temporal": "temporal",
    "update_background": "background",
    "merge_components": "merge",
    # figures, report, NWB export
    "local_correlation_image": "plot",
    "plot_contours": "plot",
    "plot_traces": "plot",
    "plot_quality": "plot",
    "plot_background": "plot",
    "plot_residual": "plot",
    "write_report": "report",
    "export_nwb": "nwb",
}

__all__ = [
    "__version__",
    "JaxcnmfError",
    "MovieError",
    "ParameterError",
    "ResultFileError",
    "TraceError",
    "Result",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxcnmf' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
