"""The Dask engine: a patch run on a local cluster of 2 worker processes (started here) gives the local result."""

from __future__ import annotations

import numpy as np
import pytest
from _scale_movies import FPS, OVERLAP, PATCH, RADIUS, planted_movie

distributed = pytest.importorskip("distributed", reason="the cluster extra (dask[distributed]) is not installed")


def test_dask_equals_local(tmp_path):
    from jaxcnmf.batch import fit_many
    from jaxcnmf.patches import fit_patches

    movie = planted_movie(seed=9)[0]
    np.save(tmp_path / "movie.npy", movie)
    path = str(tmp_path / "movie.npy")  # workers read their patches from the shared file
    kw = dict(fps=FPS, patch_size=PATCH, overlap=OVERLAP)
    local = fit_patches(path, RADIUS, **kw)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as client:
        remote = fit_patches(path, RADIUS, engine=client, checkpoint_dir=str(tmp_path / "ck"), **kw)
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        many = fit_many([movie], RADIUS, engine=client, **kw)  # an in-memory movie is scattered to the workers
    cluster.close()
    assert len(pids) == 2 and local.n_components > 0
    for res in (remote, many[0]):
        for name, arr in local.arrays().items():
            np.testing.assert_allclose(res.arrays()[name], arr, rtol=1e-5, atol=1e-5 * np.abs(arr).max(),
                                       err_msg=name)
