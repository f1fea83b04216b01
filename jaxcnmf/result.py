"""The frozen result of a CNMF fit: footprints, traces, spikes, background, noise and kinetics.

It sits at the end of the pipeline (`fit` produces it, `io.save_result` writes it, plots and scoring read it). It is an
`equinox.Module`, so it is a pytree: arrays are leaves and can be differentiated, vmapped and moved between devices.
"""

from __future__ import annotations

from typing import Any, Mapping

import equinox as eqx
import numpy as np
from jaxtyping import Array, Bool, Float

# The fields every result file holds, in the layout other tools rely on (see README, "Result file").
REQUIRED_FIELDS = ("A", "C", "S", "b", "f", "sn", "g", "YrA")
# Optional per-component fields, written when present.
OPTIONAL_FIELDS = ("baseline", "c1", "lam", "snr", "r_value", "accepted", "centers")


class Result(eqx.Module):
    """A CNMF fit of one movie of `T` frames and `H x W` pixels with `K` components and `nb` background components.

    **Fields:**

    - `A`: `(K, H, W)` spatial footprints, non-negative (CaImAn stores the same as `(H*W, K)`).
    - `C`: `(K, T)` denoised calcium traces, in the movie's intensity units times the footprint's scale
      (footprints are normalised to unit l2 norm, so `C` is "fluorescence per unit footprint").
    - `S`: `(K, T)` deconvolved spikes (the AR innovation `s = G c`), same units as `C`.
    - `b`: `(nb, H, W)` background footprints; `f`: `(nb, T)` background traces.
    - `sn`: `(H, W)` noise standard deviation of every pixel.
    - `g`: `(K, p)` AR coefficients of each component.
    - `YrA`: `(K, T)` residual traces: the part of each component's raw trace not explained by `C`.
    - `baseline`: `(K,)` constant baseline removed from each raw trace during deconvolution.
    - `c1`: `(K,)` initial calcium value at frame 0.
    - `lam`: `(K,)` the sparsity weight each trace ended with (meets the noise constraint).
    - `snr`, `r_value`: `(K,)` quality metrics; `accepted`: `(K,)` whether the acceptance rule keeps each one.
    - `centers`: `(K, 2)` footprint centres of mass (row, col).
    - `params`: the parameters the fit used (static, JSON-serialisable); `version`: jaxcnmf's version.
    """

    A: Float[Array, "K H W"]
    C: Float[Array, "K T"]
    S: Float[Array, "K T"]
    b: Float[Array, "nb H W"]
    f: Float[Array, "nb T"]
    sn: Float[Array, "H W"]
    g: Float[Array, "K p"]
    YrA: Float[Array, "K T"]
    baseline: Float[Array, " K"] | None = None
    c1: Float[Array, " K"] | None = None
    lam: Float[Array, " K"] | None = None
    snr: Float[Array, " K"] | None = None
    r_value: Float[Array, " K"] | None = None
    accepted: Bool[Array, " K"] | None = None
    centers: Float[Array, "K 2"] | None = None
    params: dict = eqx.field(static=True, default_factory=dict)
    version: str = eqx.field(static=True, default="")

    @property
    def n_components(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(T, H, W)` of the movie that was fitted."""
        return (int(self.C.shape[1]) if self.C.ndim == 2 else int(self.f.shape[1]),) + tuple(self.sn.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        """All array fields present, as numpy arrays (the result-file layout)."""
        out = {}
        for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], params: Mapping | None = None, version: str = "") -> "Result":
        """Build a result from a mapping holding at least `REQUIRED_FIELDS` (e.g. a loaded result file)."""
        missing = [k for k in REQUIRED_FIELDS if k not in arrays]
        if missing:
            from .errors import ResultFileError

            raise ResultFileError(f"result is missing the arrays {missing}; a result needs {list(REQUIRED_FIELDS)}")
        kw = {k: np.asarray(arrays[k]) for k in REQUIRED_FIELDS + OPTIONAL_FIELDS if k in arrays}
        return cls(**kw, params=dict(params or {}), version=version)
