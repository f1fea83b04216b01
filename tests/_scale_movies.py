"""Small simulated movies for the scale tests (patches, resume, batch, cluster): neurons planted on patch borders."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 48 x 48 field, patches of 32 with overlap 16: patch starts 0 and 16 on each axis, the ownership split at 23.5.
SHAPE = (48, 48)
PATCH = 32
OVERLAP = 16
RADIUS = 3.0
FPS = 30.0
# centres on the split lines (the first five, one on the corner where four patches meet) and four inside patches
CENTRES = [(24, 8), (24, 24), (24, 40), (8, 24), (40, 24), (8, 8), (8, 40), (40, 8), (40, 40)]
N_BORDER = 5


def planted_movie(seed: int = 3, n_frames: int = 100):
    """A simulated movie whose neurons are moved to `CENTRES` (the noise, traces and background kept).

    **Returns:** `(movie (T, H, W) float32, truth dict with A (K, H, W), C, S, fps)`.
    """
    from jaxcnmf.sim import simulate

    movie, tr = simulate(shape=SHAPE, n_frames=n_frames, n_neurons=len(CENTRES), radius=RADIUS, overlap=0.0,
                         spike_rate=1.0, peak_snr=8.0, fps=FPS, seed=seed)
    noise = movie - tr.noise_free()
    A = np.zeros_like(tr.A)
    for k, (r, c) in enumerate(CENTRES):
        dy, dx = np.round(np.array([r, c]) - tr.centers[k]).astype(int)
        A[k] = ndimage.shift(tr.A[k], (dy, dx), order=0, mode="constant", cval=0.0)
    clean = np.einsum("khw,kt->thw", A, tr.C) + np.einsum("bhw,bt->thw", tr.b, tr.f)
    truth = {"A": A, "C": tr.C, "S": tr.S, "fps": FPS}
    return (clean + noise).astype(np.float32), truth
