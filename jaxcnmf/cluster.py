"""Beyond one machine: patch jobs and many-movie batches on a Dask distributed cluster, with the same results as a
local run. It sits beside `patches.py` and `batch.py`, which call it for `engine="dask"` or a `distributed.Client`.

Why Dask: it is the scientific-Python standard for parallel work (numpy/scipy/xarray users already know it), it is a
pure-Python install (`pip install "jaxcnmf[cluster]"`), and the same code runs on a laptop (`LocalCluster`), on HPC
schedulers (SLURM, PBS, LSF, SGE through dask-jobqueue), on Kubernetes and on clouds (dask-kubernetes, Coiled). Jobs
are plain functions of picklable arguments, so each worker runs the ordinary `fit` on its patch; movies given by path
are read by the workers themselves (shared file system), in-memory movies are scattered once to every worker.
Results are gathered in job order, so the stitched result does not depend on which worker finished first.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .errors import ParameterError
from .result import Result

__all__ = ["run_jobs_dask", "local_cluster"]


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise ParameterError('engine="dask" needs dask distributed, which is not installed: '
                             'pip install "jaxcnmf[cluster]" (or pip install "dask[distributed]")') from e
    return distributed


def local_cluster(n_workers: int | None = None, threads_per_worker: int = 1, **kw):
    """A `distributed.Client` on a new `LocalCluster` of worker processes (one per core by default).

    **Arguments:**

    - `n_workers`: worker processes (default: the number of cores); `threads_per_worker`: threads each (JAX already
      uses the cores inside one computation); `kw`: passed to `LocalCluster`.

    **Returns:** the `Client` (close it, or use it as a context manager).
    """
    import os

    distributed = _import_distributed()
    n = n_workers or os.cpu_count() or 1
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True, **kw)
    return distributed.Client(cluster)


def _remote(job, movie):
    """Run one job on a worker; return plain arrays (a `Result` is rebuilt on the client)."""
    from .patches import run_patch_job

    res = run_patch_job(dataclasses.replace(job, movie=movie))
    return res.arrays(), dict(res.params), res.version


def run_jobs_dask(jobs: Sequence, client=None, progress=None) -> list[Result]:
    """Run `patches.PatchJob`s on a Dask cluster.

    **Arguments:**

    - `jobs`: the jobs (each carries its movie: a path the workers can read, or an in-memory movie, scattered).
    - `client`: a `distributed.Client`; `None` uses the current client, or starts a `local_cluster()` for this call.
    - `progress`: a `patches.ProgressBar` advanced as jobs finish.

    **Returns:** the `Result`s in the order of `jobs`.
    """
    import os

    distributed = _import_distributed()
    own = None
    if client is None:
        try:
            client = distributed.get_client()
        except ValueError:
            client = own = local_cluster()
    try:
        scattered: dict[int, object] = {}
        futures = []
        for job in jobs:
            movie = job.movie
            if not isinstance(movie, (str, os.PathLike)):
                if id(movie) not in scattered:
                    scattered[id(movie)] = client.scatter(movie, broadcast=True)
                movie = scattered[id(movie)]
            futures.append(client.submit(_remote, dataclasses.replace(job, movie=None), movie, pure=False))
        index = {f.key: i for i, f in enumerate(futures)}
        resumed = {f.key: j.checkpoint is not None and os.path.exists(j.checkpoint) for f, j in zip(futures, jobs)}
        out: list[Result | None] = [None] * len(futures)
        for fut in distributed.as_completed(futures):
            arrays, params, version = fut.result()
            out[index[fut.key]] = Result.from_arrays(arrays, params, version)
            if progress is not None:
                progress.update(skipped=resumed[fut.key])
        return out
    finally:
        if own is not None:
            cluster = own.cluster
            own.close()
            cluster.close()
