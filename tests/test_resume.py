"""Checkpointed resume: a patch run interrupted after two of its four patches, rerun on the same folder, fits only the
missing patches and gives exactly the result of an uninterrupted run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _scale_movies import FPS, OVERLAP, PATCH, RADIUS, planted_movie

import jaxcnmf.patches as patches


_REAL_FIT = patches._fit_window


class Interrupted(RuntimeError):
    pass


def _counting(monkeypatch, fail_after=None):
    """Wrap the per-patch fit: count calls, raise after `fail_after` finished patches (as a kill would)."""
    calls = []

    def wrapped(window, params):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted("killed")
        calls.append(1)
        return _REAL_FIT(window, params)

    monkeypatch.setattr(patches, "_fit_window", wrapped)
    return calls


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    movie, _ = planted_movie(seed=5)
    np.save(tmp_path / "movie.npy", movie)  # from disk, memory-mapped, as a long run would be
    path = str(tmp_path / "movie.npy")
    kw = dict(fps=FPS, patch_size=PATCH, overlap=OVERLAP)

    reference = patches.fit_patches(path, RADIUS, checkpoint_dir=str(tmp_path / "ref"), **kw)

    ck = tmp_path / "ck"
    calls = _counting(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        patches.fit_patches(path, RADIUS, checkpoint_dir=str(ck), **kw)
    done = sorted(n for n in os.listdir(ck) if n.startswith("patch_"))
    assert len(done) == 2 and len(calls) == 2  # the finished patches are on disk, nothing half-written
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp.npz")]

    calls = _counting(monkeypatch)
    resumed = patches.fit_patches(path, RADIUS, checkpoint_dir=str(ck), **kw)
    assert len(calls) == 2  # only the two missing patches were fitted

    a, b = reference.arrays(), resumed.arrays()
    assert a.keys() == b.keys() and reference.n_components > 0
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert resumed.params == reference.params

    calls = _counting(monkeypatch)
    again = patches.fit_patches(path, RADIUS, checkpoint_dir=str(ck), **kw)  # everything from checkpoints
    assert len(calls) == 0
    np.testing.assert_array_equal(again.C, reference.C)
