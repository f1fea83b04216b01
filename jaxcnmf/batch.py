"""Many movies at once: `fit_many` fits a list of same-shaped movies (planes of a volume, sessions of a field) in one
call, on all local JAX devices or a Dask cluster. It sits beside `patches.py`, on top of `fit`.

Every movie (or every patch of every movie) is one job of the same shape, so one compiled fit serves them all; the
jobs are spread over the local devices (one worker thread per device, pinned with `jax.default_device`) or over Dask
workers, and each movie's whole-field passes are sharded over the devices (`patches.Streamer`, a `NamedSharding` on a
1-D mesh). The fit's stages decide on the host between steps (which pixel seeds the next neuron, which components
conflict), so movies are not vmapped through the whole fit; they share compiled code and devices instead.
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import MovieError, ParameterError
from .result import Result

__all__ = ["fit_many"]


def _open_all(movies: Sequence[Any], nonfinite: str):
    """Open every movie and check they share one shape (before any fitting)."""
    from .io import open_movie

    if isinstance(movies, (str, bytes)) or not isinstance(movies, Sequence) or len(movies) == 0:
        raise ParameterError("movies: expected a non-empty list of movies (paths, (T, H, W) arrays or MovieSources)")
    sources = []
    for i, m in enumerate(movies):
        try:
            sources.append(open_movie(m, nonfinite=nonfinite, min_frames=1))
        except MovieError as e:
            raise MovieError(f"movies[{i}]: {e}") from e
    shape = sources[0].shape
    for i, s in enumerate(sources[1:], start=1):
        if s.shape != shape:
            raise MovieError(f"movies[{i}] ({s.path or 'array'}) has shape {s.shape}, but movies[0] has {shape}; "
                             f"fit_many needs same-shaped movies (fit the others with their own call)")
    return sources


def fit_many(movies: Sequence[Any], neuron_radius: float | None = None, *, patch_size: int | None = None,
             overlap: int | None = None, params=None, checkpoint_dir: str | None = None, engine="local",
             devices=None, memory_budget: int | str | None = None, n_refine: int = 1, progress: bool = False,
             **overrides) -> list[Result]:
    """Fit CNMF to several same-shaped movies with one set of parameters, in one call.

    With `patch_size=None` each movie is one job (an ordinary whole-field `fit.fit`); with a `patch_size`, each movie is
    tiled (`patches.fit_patches`) and the patches of all movies form one list of jobs, then every movie is stitched
    and refined on its own. Jobs run on `engine` ("local": this process, spread over `devices`; "dask" or a
    `distributed.Client`: a cluster), each checkpointed under `checkpoint_dir` when given (a rerun resumes). The
    results do not depend on the engine or the number of devices.

    **Arguments:**

    - `movies`: list of paths, `(T, H, W)` arrays or `MovieSource`s, all of one shape (checked first).
    - `neuron_radius`, `params`, `overrides`: as for `fit.fit`.
    - `patch_size`, `overlap`, `memory_budget`, `n_refine`: as for `patches.fit_patches` (`patch_size=None`: no
      patches).
    - `checkpoint_dir`: folder for per-job results (files are prefixed by the movie's index).
    - `engine`, `devices`: where jobs run (see `patches.run_jobs`).
    - `progress`: a progress bar with time remaining on stderr.

    **Returns:** one `Result` per movie, in order.
    """
    import numpy as np

    from .fit import check_movie_shape, make_params
    from .patches import PatchJob, ProgressBar, finish_patches, plan_patches, prepare_checkpoints, run_jobs

    prm = make_params(neuron_radius, params=params, **overrides)
    sources = _open_all(movies, prm.nonfinite)
    T, H, W = sources[0].shape
    check_movie_shape((T, H, W), prm, "movies[0]")
    if patch_size is None:
        box = np.array([[0, H, 0, W]])
        jobs = []
        for i, src in enumerate(sources):
            ck = prepare_checkpoints(checkpoint_dir, box, src, prm.to_dict(), tag=f"movie{i:04d}_")[0]
            jobs.append(PatchJob(src.path if src.path is not None else src, (0, H, 0, W), prm.to_dict(), ck,
                                 src.chunk_frames))
        bar = ProgressBar(len(jobs), "movies", enabled=progress)
        return list(run_jobs(jobs, engine, devices=devices, progress=bar))
    plans = [plan_patches(src, params=prm, patch_size=patch_size, overlap=overlap, checkpoint_dir=checkpoint_dir,
                          memory_budget=memory_budget, tag=f"movie{i:04d}_") for i, src in enumerate(sources)]
    jobs = [job for plan in plans for job in plan.jobs]
    bar = ProgressBar(len(jobs), f"patches of {len(plans)} movies", enabled=progress)
    results = run_jobs(jobs, engine, devices=devices, progress=bar)
    out, i = [], 0
    for plan in plans:
        n = len(plan.jobs)
        out.append(finish_patches(plan, results[i:i + n], devices=devices, n_refine=n_refine, progress=bar))
        i += n
    return out
