"""A small hand-built fit result and its movie (Gaussian footprints, known traces) for the plot/report/NWB tests."""

from __future__ import annotations

import numpy as np

from jaxcnmf.result import Result


def gaussian(shape, center, sigma):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))


def small_fit(T: int = 200, shape=(24, 30), seed: int = 0, noise: float = 0.5):
    """A `Result` with 4 components (one rejected) and the movie `A C + b f + noise` it describes exactly.

    **Returns:** `(result, movie float32 (T, H, W), sigma of the footprints)`.
    """
    rng = np.random.default_rng(seed)
    H, W = shape
    sigma = 2.0
    centers = np.array([[6.0, 7.0], [7.0, 20.0], [17.0, 9.0], [16.0, 22.0]])
    A = np.stack([gaussian(shape, c, sigma) for c in centers])
    A /= np.linalg.norm(A.reshape(len(A), -1), axis=1)[:, None, None]
    g = np.array([[1.5, -0.55]] * len(A))
    S = (rng.random((len(A), T)) < 0.04) * rng.uniform(1.0, 3.0, (len(A), T))
    C = np.zeros_like(S)
    for t in range(T):
        C[:, t] = S[:, t] + (g[:, 0] * C[:, t - 1] if t >= 1 else 0) + (g[:, 1] * C[:, t - 2] if t >= 2 else 0)
    C *= 20.0
    S *= 20.0
    b = (10.0 + gaussian(shape, (H / 2, W / 2), 10.0))[None]
    f = (1.0 + 0.1 * np.sin(np.arange(T) / 15.0))[None]
    sn = np.full(shape, noise)
    Y = np.einsum("khw,kt->thw", A, C) + np.einsum("khw,kt->thw", b, f) + rng.normal(0, noise, (T, H, W))
    YrA = rng.normal(0, 1.0, C.shape)
    result = Result(
        A=A.astype(np.float32), C=C.astype(np.float32), S=S.astype(np.float32), b=b.astype(np.float32),
        f=f.astype(np.float32), sn=sn.astype(np.float32), g=g.astype(np.float32), YrA=YrA.astype(np.float32),
        snr=np.array([12.0, 8.0, 4.0, 1.5], np.float32), r_value=np.array([0.95, 0.9, 0.85, 0.3], np.float32),
        accepted=np.array([True, True, True, False]), centers=centers.astype(np.float32),
        params={"fps": 20.0, "min_snr": 2.5, "rval_thr": 0.8, "snr_lowest": 1.5, "rval_lowest": 0.5, "neuron_radius": 3.0,
                "timings": {"noise": 0.5, "initialise": 1.25, "total": 4.0}},
        version="test",
    )
    return result, Y.astype(np.float32), sigma
