"""Ground-truth movies: a seeded generator of two-photon calcium-imaging movies that records every hidden quantity.

It sits beside the pipeline and feeds it: the demo, the tests and the benchmarks fit `simulate`'s movie and score the
fit against its `Truth` (`metrics.score_result`). Plain numpy; nothing here imports JAX.

The movie is built exactly as the model the fit assumes, plus the nuisances real data has:

    movie[t] = shift_t( A C[:, t] + b f[:, t] ) + noise[t] + offset        (then rounded, if `quantize`)

`Truth.noise_free(start, stop)` re-renders the bracketed part from the stored arrays with the very same code, so
`movie - truth.noise_free()` is the noise (zero-mean, standard deviation `truth.sn` per pixel).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, signal, sparse
from scipy.spatial import cKDTree

from ._version import __version__
from .errors import ParameterError, ResultFileError

__all__ = ["SimParams", "Truth", "simulate", "save_truth", "load_truth", "peak_snr", "truth_path_for"]

# Frames rendered at a time. Fixed (not derived from memory) so that a seed gives the same movie on every machine.
_CHUNK = 128
# Footprint values below this fraction of the footprint's maximum are set to exactly zero (footprints stay local).
_CUTOFF = 0.01
_UINT16_MAX = 65535.0


# --------------------------------------------------------------------------------------------------------------------
# Knobs
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimParams:
    """Every knob of the simulator, with its unit. Pass overrides to `simulate(**overrides)` or build one directly.

    **Field and time**

    - `shape`: `(H, W)` field size in pixels.
    - `n_frames`: number of frames `T`.
    - `fps`: frame rate in Hz.

    **Cells** (`mode="soma"`: round-ish somata; `mode="dendrite"`: thin branching processes)

    - `n_neurons`: number of somata, or in dendrite mode the number of processes (each process can add branch-local
      components, see `branch_event_ratio`, so `Truth.A` may hold more than `n_neurons` footprints).
    - `radius`: mean soma radius in pixels (soma mode only).
    - `radius_jitter`: standard deviation of the per-neuron radius, as a fraction of `radius`.
    - `ellipticity`: 0 gives round somata; otherwise each soma's minor/major axis ratio is `1 - ellipticity * u`,
      `u ~ Uniform(0, 1)`, with a random orientation and the area of the round soma kept.
    - `nucleus`: depth (0..1) of the dim nucleus at the soma's centre (GCaMP is excluded from the nucleus).
    - `overlap`: fraction (0..1) of the neurons deliberately placed partly overlapping an earlier neuron (centre
      distance 0.7-1.5 radii; in dendrite mode: processes drawn straight through a point of an earlier process, i.e.
      crossing it). The other neurons keep `min_distance` radii between centres (dendrites are not kept apart and may
      also cross by chance).
    - `min_distance`: minimum centre distance, in radii, between neurons that are not deliberately overlapping.
    - `dendrite_width`: `(low, high)` full width at half maximum of a process in pixels, drawn uniformly per process.
    - `dendrite_length`: mean trunk length as a fraction of the field's larger side (each process draws 0.5-1.5 times
      it; a trunk stops early where it leaves the field).
    - `branches`: mean number of side branches per process (Poisson); each leaves the trunk at 25-60 degrees.
    - `curvature`: standard deviation of a process's curvature in radians per pixel (curvature varies smoothly, with a
      correlation length of 10 px).

    **Activity**

    - `tau_decay`, `tau_rise`: calcium decay and rise time constants in seconds. `tau_rise` of 0 or None gives AR(1)
      kinetics (`g = d`), otherwise AR(2) with `g1 = d + r`, `g2 = -d r`, `d = exp(-1/(tau_decay fps))`,
      `r = exp(-1/(tau_rise fps))`.
    - `tau_jitter`: per-neuron log-normal spread (coefficient of variation) of both time constants (a neuron's rise
      time stays shorter than its decay time).
    - `spike_rate`: mean rate of spike events per neuron, in Hz (per-neuron rates are gamma distributed with
      coefficient of variation `rate_cv`). Each event starts a burst with probability `burst_prob`; a burst holds
      `burst_size` spikes on average (at least 2), spread over the 0.1 s after the event.
    - `spike_amplitude`: mean peak of the calcium transient of one spike at the footprint's brightest pixel, in units
      of `background_level` (i.e. the single-spike dF/F0 against the mean background).
    - `amplitude_cv`: coefficient of variation of the log-normal amplitude of single spikes.
    - `brightness_cv`: coefficient of variation of the log-normal per-neuron brightness (scales all its spikes).
    - `branch_event_ratio`: dendrite mode: each side branch gets its own branch-local events at
      `branch_event_ratio * spike_rate` (a separate component of `Truth`, whose `parent` is the process); events on the
      process's own trace are back-propagating, shared by the whole process. 0 disables branch-local events.

    **Background** (all non-negative; rows of `Truth.b`, `Truth.f`)

    - `background_rank`: 1 or 2 smooth background components.
    - `background_level`: mean intensity of the smooth part of the first background component, in movie units
      (arbitrary units; it sets the scale of everything else).
    - `background_timescale`: time scale of the slow background fluctuations, in seconds.
    - `resting_brightness`: resting fluorescence of the cells above the background, as a fraction of
      `background_level` (part of the first background component, so cells show in the mean image as in real data).
    - `bleaching`: fraction of the first background component lost to photobleaching by the last frame.
    - `neuropil`: mean intensity of the neuropil, a spatially smooth field carrying the shared, slowly varying activity
      of many out-of-focus cells, as a fraction of `background_level`. When > 0 it is the LAST background component
      (`Truth.b[-1]`, `Truth.f[-1]`; `Truth.params["neuropil_index"]`), so `nb = background_rank + 1`.

    **Noise and motion**

    - `noise`: `"gaussian"` (time-constant per-pixel standard deviation) or `"poisson-gaussian"` (photon shot noise,
      `gain * Poisson(F / gain)`, plus Gaussian read noise). In both, the noise variance of pixel i is
      `gain * (mean_t F_i + read_noise_ratio * median_i mean_t F_i)`, time-averaged for Poisson noise, where F is the
      noise-free movie; `gain` is set to meet `peak_snr`.
    - `read_noise_ratio`: variance of the intensity-independent noise relative to the shot-noise variance of a pixel
      of median brightness (large values give spatially uniform noise).
    - `peak_snr`: the median, over the neurons (somata, or whole processes) that fire at least once, of each neuron's
      largest noise-free contribution `max_t a_k[i_k] c_k[t]` at its brightest pixel `i_k` divided by that pixel's
      noise standard deviation `sn[i_k]` (`a_k[i_k] = 1`, footprints have unit maximum). See `peak_snr(truth)`.
    - `motion_px`: standard deviation, in pixels, of independent rigid per-frame shifts along each axis (bilinear
      sub-pixel shifts, edges clamped; `Truth` stays in the unshifted frame and records `shifts`). 0 disables motion.
    - `offset`: constant added to every pixel after the noise (as an acquisition offset would).
    - `quantize`: round the movie to integers and clip it to the uint16 range [0, 65535], like a uint16 recording
      (the rounding error, variance 1/12, is counted in `sn`; the number of clipped samples is
      `Truth.params["n_clipped"]`).
    """

    shape: tuple[int, int] = (128, 128)
    n_frames: int = 1000
    fps: float = 30.0
    mode: str = "soma"
    n_neurons: int = 40
    radius: float = 4.0
    radius_jitter: float = 0.15
    ellipticity: float = 0.3
    nucleus: float = 0.3
    overlap: float = 0.1
    min_distance: float = 2.5
    dendrite_width: tuple[float, float] = (1.0, 2.0)
    dendrite_length: float = 0.6
    branches: float = 2.0
    curvature: float = 0.05
    tau_decay: float = 0.5
    tau_rise: float | None = 0.05
    tau_jitter: float = 0.0
    spike_rate: float = 0.5
    rate_cv: float = 0.5
    burst_prob: float = 0.1
    burst_size: float = 3.0
    spike_amplitude: float = 0.5
    amplitude_cv: float = 0.4
    brightness_cv: float = 0.3
    branch_event_ratio: float = 0.5
    background_rank: int = 1
    background_level: float = 100.0
    background_timescale: float = 10.0
    resting_brightness: float = 0.3
    bleaching: float = 0.0
    neuropil: float = 0.3
    noise: str = "gaussian"
    read_noise_ratio: float = 1.0
    peak_snr: float = 5.0
    motion_px: float = 0.0
    offset: float = 0.0
    quantize: bool = False

    def __post_init__(self):
        shape = tuple(int(s) for s in np.atleast_1d(self.shape))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dendrite_width", tuple(float(w) for w in np.atleast_1d(self.dendrite_width)))
        if self.tau_rise is not None and float(self.tau_rise) == 0.0:
            object.__setattr__(self, "tau_rise", None)
        _check_params(self)

    @property
    def p(self) -> int:
        """AR order of the calcium kinetics: 1 without a rise time, else 2."""
        return 1 if self.tau_rise is None else 2

    @property
    def n_background(self) -> int:
        """Number of background components `nb` in `Truth.b` (the neuropil, when on, is one of them)."""
        return self.background_rank + (1 if self.neuropil > 0 else 0)

    def to_dict(self) -> dict:
        """JSON-able dict of the knobs (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _check_params(p: SimParams) -> None:
    """Raise `ParameterError` naming the first knob outside its valid range."""

    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ParameterError(f"SimParams.{name}={getattr(p, name)!r} is invalid: {what}")

    need(len(p.shape) == 2 and min(p.shape) >= 8, "shape", "give (height, width), each at least 8 pixels")
    need(int(p.n_frames) >= 2, "n_frames", "need at least 2 frames")
    need(p.fps > 0, "fps", "the frame rate must be positive (Hz)")
    need(p.mode in ("soma", "dendrite"), "mode", "use 'soma' or 'dendrite'")
    need(int(p.n_neurons) >= 1, "n_neurons", "need at least one neuron")
    need(p.radius > 0 and (p.mode != "soma" or 2 * p.radius < min(p.shape)), "radius",
         "must be positive, and a soma (diameter 2 radius) must fit in the field")
    need(0 <= p.radius_jitter < 1, "radius_jitter", "a fraction in [0, 1)")
    need(0 <= p.ellipticity < 1, "ellipticity", "a fraction in [0, 1)")
    need(0 <= p.nucleus < 1, "nucleus", "a fraction in [0, 1)")
    need(0 <= p.overlap <= 1, "overlap", "a fraction in [0, 1]")
    need(p.min_distance >= 0, "min_distance", "a distance in radii, >= 0")
    need(len(p.dendrite_width) == 2 and 0 < p.dendrite_width[0] <= p.dendrite_width[1], "dendrite_width",
         "give (low, high) widths in pixels with 0 < low <= high")
    need(p.dendrite_length > 0, "dendrite_length", "a positive fraction of the field size")
    need(p.branches >= 0, "branches", "a mean count, >= 0")
    need(p.curvature >= 0, "curvature", "radians per pixel, >= 0")
    need(p.tau_decay > 0, "tau_decay", "a positive time in seconds")
    need(p.tau_rise is None or 0 < p.tau_rise < p.tau_decay, "tau_rise",
         "0/None for AR(1) kinetics, or a positive time shorter than tau_decay")
    need(p.tau_jitter >= 0, "tau_jitter", "a coefficient of variation, >= 0")
    need(p.spike_rate >= 0, "spike_rate", "a rate in Hz, >= 0")
    need(p.rate_cv >= 0, "rate_cv", "a coefficient of variation, >= 0")
    need(0 <= p.burst_prob <= 1, "burst_prob", "a probability in [0, 1]")
    need(p.burst_size >= 2, "burst_size", "the mean number of spikes in a burst, >= 2")
    need(p.spike_amplitude > 0, "spike_amplitude", "a positive fraction of background_level")
    need(p.amplitude_cv >= 0, "amplitude_cv", "a coefficient of variation, >= 0")
    need(p.brightness_cv >= 0, "brightness_cv", "a coefficient of variation, >= 0")
    need(p.branch_event_ratio >= 0, "branch_event_ratio", "a ratio of rates, >= 0")
    need(p.background_rank in (1, 2), "background_rank", "use 1 or 2")
    need(p.background_level > 0, "background_level", "a positive intensity (the noise model needs light)")
    need(p.background_timescale > 0, "background_timescale", "a positive time in seconds")
    need(p.resting_brightness >= 0, "resting_brightness", "a fraction of background_level, >= 0")
    need(0 <= p.bleaching < 1, "bleaching", "a fraction in [0, 1)")
    need(p.neuropil >= 0, "neuropil", "a fraction of background_level, >= 0")
    need(p.noise in ("gaussian", "poisson-gaussian"), "noise", "use 'gaussian' or 'poisson-gaussian'")
    need(p.read_noise_ratio >= 0, "read_noise_ratio", "a variance ratio, >= 0")
    need(p.peak_snr > 0, "peak_snr", "a positive signal-to-noise ratio")
    need(p.motion_px >= 0, "motion_px", "a standard deviation in pixels, >= 0")
    need(math.isfinite(p.offset), "offset", "a finite intensity")


# --------------------------------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Truth:
    """Everything hidden in a simulated movie. Arrays are float32 numpy arrays unless said otherwise.

    **Fields:**

    - `A`: `(K, H, W)` footprints, non-negative, each scaled to a maximum of exactly 1 (so `C` is the signal at the
      footprint's brightest pixel). Components `0 .. n_neurons-1` are the somata (or whole processes); in dendrite mode
      branch-local components follow.
    - `C`: `(K, T)` noise-free calcium, in movie units; starts in steady state (spikes before frame 0 are simulated).
    - `S`: `(K, T)` spikes, the AR innovation: `S[:, t] = C[:, t] - sum_j g_j C[:, t-j]` for `t >= p`.
    - `b`: `(nb, H, W)` background footprints; `f`: `(nb, T)` background traces (non-negative; f is about 1).
    - `sn`: `(H, W)` noise standard deviation of each pixel (RMS over frames for Poisson-Gaussian noise).
    - `g`: `(K, p)` AR coefficients of each component (from its time constants, see `SimParams`).
    - `centers`: `(K, 2)` centre of mass (row, col) of each footprint, in pixels.
    - `shifts`: `(T, 2)` rigid shift (rows, cols) of each frame: `movie[t](y, x) = F[t](y - dy, x - dx)`.
    - `parent`: `(K,)` int: the soma/process each component belongs to (`parent[k] == k` for whole cells).
    - `offset`: constant added to the movie; `fps`: frame rate in Hz; `params`: the knobs, the seed and derived
      quantities (`gain`, `neuropil_index`, `n_clipped`, `version`).
    """

    A: np.ndarray
    C: np.ndarray
    S: np.ndarray
    b: np.ndarray
    f: np.ndarray
    sn: np.ndarray
    g: np.ndarray
    centers: np.ndarray
    shifts: np.ndarray
    parent: np.ndarray
    offset: float
    fps: float
    params: dict

    ARRAYS = ("A", "C", "S", "b", "f", "sn", "g", "centers", "shifts", "parent")

    def __repr__(self) -> str:
        T, H, W = self.shape
        return (f"Truth(T={T}, H={H}, W={W}, K={self.A.shape[0]}, cells={self.n_neurons}, nb={self.b.shape[0]}, "
                f"p={self.g.shape[1]}, fps={self.fps:g}, seed={self.params.get('seed')})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(T, H, W)` of the movie."""
        return (int(self.C.shape[1]),) + tuple(int(s) for s in self.sn.shape)

    @property
    def n_neurons(self) -> int:
        """Number of whole cells (somata or processes); `A` holds `n_neurons` of them first."""
        return int(np.sum(self.parent == np.arange(self.parent.size)))

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields by name."""
        return {k: getattr(self, k) for k in self.ARRAYS}

    def noise_free(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The noise-free movie `shift_t(A C + b f) + offset` for frames `start:stop`, float32 `(frames, H, W)`.

        Rendered by the same code as the movie, so `movie[start:stop] - truth.noise_free(start, stop)` is the noise.
        """
        T = self.shape[0]
        stop = T if stop is None else min(int(stop), T)
        start = max(int(start), 0)
        out = _render(self.A, self.C, self.b, self.f, self.shifts, start, stop)
        out += np.float32(self.offset)
        return out


def _render(A, C, b, f, shifts, start: int, stop: int) -> np.ndarray:
    """`shift_t(A C[:, t] + b f[:, t])` for `t` in `start:stop`, float32 `(frames, H, W)`, built chunk by chunk."""
    K, H, W = A.shape
    out = np.empty((stop - start, H, W), np.float32)
    A_sp = sparse.csr_array(A.reshape(K, H * W).astype(np.float32))
    b_flat = b.reshape(b.shape[0], H * W).astype(np.float32)
    for t0 in range(start, stop, _CHUNK):
        t1 = min(t0 + _CHUNK, stop)
        frames = out[t0 - start : t1 - start].reshape(t1 - t0, H * W)
        np.matmul(f[:, t0:t1].astype(np.float32).T, b_flat, out=frames)
        frames += np.asarray(C[:, t0:t1].astype(np.float32).T @ A_sp)
        if np.any(shifts[t0:t1] != 0):
            out[t0 - start : t1 - start] = _shift_frames(out[t0 - start : t1 - start], shifts[t0:t1])
    return out


def _shift_frames(frames: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Bilinear sub-pixel rigid shift of each frame by `(dy, dx)`: `out(y, x) = frame(y - dy, x - dx)`, edges clamped.

    **Arguments:** `frames` `(n, H, W)`; `shifts` `(n, 2)`.
    **Returns:** the shifted frames, float32 `(n, H, W)`.
    """
    n, H, W = frames.shape
    out = np.empty_like(frames)
    rows, cols = np.arange(H), np.arange(W)
    for i in range(n):
        dy, dx = float(shifts[i, 0]), float(shifts[i, 1])
        y0, fy = np.divmod(rows - dy, 1.0)
        x0, fx = np.divmod(cols - dx, 1.0)
        y0 = y0.astype(int)
        x0 = x0.astype(int)
        ya, yb = np.clip(y0, 0, H - 1), np.clip(y0 + 1, 0, H - 1)
        xa, xb = np.clip(x0, 0, W - 1), np.clip(x0 + 1, 0, W - 1)
        fy = fy.astype(np.float32)[:, None]
        fx = fx.astype(np.float32)[None, :]
        tmp = (1 - fy) * frames[i][ya] + fy * frames[i][yb]
        out[i] = (1 - fx) * tmp[:, xa] + fx * tmp[:, xb]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Kinetics and spikes
# --------------------------------------------------------------------------------------------------------------------


def _ar_coefficients(tau_decay: float, tau_rise: float | None, fps: float) -> np.ndarray:
    """AR coefficients of a calcium transient with the given time constants (seconds) at `fps` Hz.

    **Arguments:** `tau_decay`, `tau_rise` (None or 0 for AR(1)), `fps`.
    **Returns:** `g`, float64 `(1,)` = `[d]` or `(2,)` = `[d + r, -d r]`, `d = exp(-1/(tau_decay fps))`,
    `r = exp(-1/(tau_rise fps))`.
    """
    d = math.exp(-1.0 / (tau_decay * fps))
    if not tau_rise:
        return np.array([d])
    r = math.exp(-1.0 / (tau_rise * fps))
    return np.array([d + r, -d * r])


def _kernel_peak(g: np.ndarray, n: int) -> float:
    """Maximum of the impulse response of `c_t = sum_j g_j c_{t-j} + s_t` (1 for AR(1), larger for AR(2))."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return float(signal.lfilter([1.0], np.r_[1.0, -g], impulse).max())


def _lognormal(rng: np.random.Generator, cv: float, size) -> np.ndarray:
    """Log-normal samples with mean 1 and coefficient of variation `cv` (all ones when `cv` is 0)."""
    s2 = math.log1p(cv * cv)
    return rng.lognormal(-s2 / 2, math.sqrt(s2), size)


def _event_rates(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    """Per-cell event rates (Hz): gamma distributed with the given mean and coefficient of variation."""
    if cv == 0 or mean == 0:
        return np.full(n, float(mean))
    k = 1.0 / (cv * cv)
    return rng.gamma(k, mean / k, n)


def _spike_train(rng: np.random.Generator, rates: np.ndarray, n_frames: int, p: SimParams) -> np.ndarray:
    """Spike amplitudes per frame for each cell: Poisson events, some starting bursts, log-normal amplitudes.

    **Arguments:** `rates` `(K,)` event rates in Hz; `n_frames`; `p` the knobs (fps, burst_*, amplitude_cv).
    **Returns:** float64 `(K, n_frames)`, each spike of mean amplitude 1 (summed within a frame).
    """
    K = rates.size
    counts = rng.poisson(np.repeat(rates[:, None] / p.fps, n_frames, axis=1))
    k_idx, t_idx = np.nonzero(counts)
    reps = counts[k_idx, t_idx]
    ev_k, ev_t = np.repeat(k_idx, reps), np.repeat(t_idx, reps)
    bursts = rng.random(ev_k.size) < p.burst_prob
    n_extra = 1 + rng.poisson(p.burst_size - 2.0, int(bursts.sum()))
    window = max(1, int(round(0.1 * p.fps)))
    ex_k = np.repeat(ev_k[bursts], n_extra)
    ex_t = np.repeat(ev_t[bursts], n_extra) + rng.integers(0, window + 1, ex_k.size)
    all_k = np.concatenate([ev_k, ex_k])
    all_t = np.concatenate([ev_t, ex_t])
    keep = all_t < n_frames
    amps = _lognormal(rng, p.amplitude_cv, all_k.size)
    S = np.zeros((K, n_frames))
    np.add.at(S, (all_k[keep], all_t[keep]), amps[keep])
    return S


def _calcium(S: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Calcium from spikes through each row's AR filter `c_t = sum_j g[k, j] c_{t-j} + s_t` (float64)."""
    return np.stack([signal.lfilter([1.0], np.r_[1.0, -gk], sk) for sk, gk in zip(S, g)]) if len(S) else S.copy()


def _kinetics(rng: np.random.Generator, K: int, p: SimParams) -> np.ndarray:
    """Per-cell AR coefficients `(K, p)` from the time constants, with log-normal jitter `tau_jitter`."""
    jd = _lognormal(rng, p.tau_jitter, K)
    jr = _lognormal(rng, p.tau_jitter, K)
    rise = [None if p.tau_rise is None else p.tau_rise * min(a, b) for a, b in zip(jr, jd)]
    return np.stack([_ar_coefficients(p.tau_decay * a, r, p.fps) for a, r in zip(jd, rise)])


# --------------------------------------------------------------------------------------------------------------------
# Footprints
# --------------------------------------------------------------------------------------------------------------------


def _unit_max(a: np.ndarray) -> np.ndarray:
    """Zero values below `_CUTOFF` of the maximum and scale to a maximum of 1 (float32)."""
    a = np.where(a >= _CUTOFF * a.max(), a, 0.0) / a.max()
    return a.astype(np.float32)


def _soma(shape, center, radius: float, ratio: float, angle: float, nucleus: float) -> np.ndarray:
    """One soma: a soft-edged ellipse (area of a disc of `radius`) with a dim nucleus, unit maximum, `(H, W)`.

    **Arguments:** `center` (row, col); `ratio` minor/major axis ratio; `angle` of the major axis in radians;
    `nucleus` depth of the central dip.
    """
    H, W = shape
    major, minor = radius / math.sqrt(ratio), radius * math.sqrt(ratio)
    edge = 0.12
    reach = major * (1 + 6 * edge) + 1
    r0, r1 = max(0, int(center[0] - reach)), min(H, int(center[0] + reach) + 2)
    c0, c1 = max(0, int(center[1] - reach)), min(W, int(center[1] + reach) + 2)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(float)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    rho = np.sqrt((u / major) ** 2 + (v / minor) ** 2)
    body = 0.5 * (1 - np.tanh((rho - 1) / (2 * edge)))  # logistic edge of width `edge` radii
    body *= 1 - nucleus * np.exp(-(rho**2) / (2 * 0.35**2))
    out = np.zeros(shape)
    out[r0:r1, c0:c1] = body
    return _unit_max(out)


def _place_somata(rng: np.random.Generator, radii: np.ndarray, p: SimParams) -> np.ndarray:
    """Soma centres (row, col): the last `round(overlap K)` next to a random earlier soma, the rest `min_distance` apart.

    Rejection sampling with a bounded number of tries; raises `ParameterError` when the field is too crowded.
    """
    H, W = p.shape
    K = radii.size
    n_free = max(K - int(round(p.overlap * K)), 1)
    centers = np.zeros((K, 2))
    tries = 2000
    for k in range(K):
        m = radii[k]
        for _ in range(tries):
            if k < n_free:
                c = rng.uniform([m, m], [H - m, W - m])
                dist = np.hypot(*(centers[:k] - c).T)
                ok = np.all(dist >= p.min_distance * 0.5 * (radii[:k] + m))
            else:
                j = rng.integers(0, k)
                ang = rng.uniform(0, 2 * np.pi)
                c = centers[j] + rng.uniform(0.7, 1.5) * 0.5 * (radii[j] + m) * np.array([np.sin(ang), np.cos(ang)])
                dist = np.hypot(*(centers[:k] - c).T)
                inside = m <= c[0] <= H - m and m <= c[1] <= W - m
                ok = inside and np.all(dist >= 0.7 * 0.5 * (radii[:k] + m))
            if ok:
                centers[k] = c
                break
        else:
            raise ParameterError(
                f"simulate: could not place neuron {k + 1} of n_neurons={K} with radius={p.radius} px and "
                f"min_distance={p.min_distance} radii in a {H}x{W} field; use fewer neurons, a smaller radius or "
                "min_distance, or a larger shape"
            )
    return centers


def _soma_footprints(rng: np.random.Generator, p: SimParams) -> np.ndarray:
    """All soma footprints `(K, H, W)`, unit maximum each."""
    K = int(p.n_neurons)
    radii = p.radius * np.clip(1 + p.radius_jitter * rng.standard_normal(K), 0.3, None)
    centers = _place_somata(rng, radii, p)
    ratios = 1 - p.ellipticity * rng.uniform(0, 1, K)
    angles = rng.uniform(0, np.pi, K)
    return np.stack(
        [_soma(p.shape, centers[k], radii[k], ratios[k], angles[k], p.nucleus) for k in range(K)]
    )


def _walk(rng: np.random.Generator, start, heading: float, length: float, shape, curvature: float) -> np.ndarray:
    """A smooth random path from `start` along `heading`: points every 0.25 px, curvature an AR(1) process.

    **Returns:** `(n, 2)` points (row, col), the first being `start`, cut where the path leaves the field.
    """
    step, corr = 0.25, 10.0
    n = max(1, int(length / step))
    a = math.exp(-step / corr)
    kappa = signal.lfilter([math.sqrt(1 - a * a)], [1, -a], rng.standard_normal(n)) * curvature
    theta = heading + np.cumsum(kappa * step)
    pts = np.asarray(start, float) + np.cumsum(step * np.stack([np.sin(theta), np.cos(theta)], 1), 0)
    pts = np.vstack([np.asarray(start, float)[None], pts])
    H, W = shape
    inside = (pts[:, 0] >= -0.5) & (pts[:, 0] <= H - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] <= W - 0.5)
    end = int(np.argmin(inside)) if not inside.all() else pts.shape[0]
    return pts[: max(end, 1)]


def _draw_path(points: np.ndarray, width: float, shape) -> np.ndarray:
    """A path drawn as a line of Gaussian cross-section with full width at half maximum `width` px, `(H, W)`."""
    H, W = shape
    sigma = width / 2.3548
    reach = 3 * sigma + 1
    r0, r1 = max(0, int(points[:, 0].min() - reach)), min(H, int(points[:, 0].max() + reach) + 2)
    c0, c1 = max(0, int(points[:, 1].min() - reach)), min(W, int(points[:, 1].max() + reach) + 2)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    dist, _ = cKDTree(points).query(np.stack([yy.ravel(), xx.ravel()], 1), distance_upper_bound=reach)
    out = np.zeros(shape)
    out[r0:r1, c0:c1] = np.exp(-0.5 * (dist / sigma) ** 2).reshape(yy.shape)
    return out


def _process(rng: np.random.Generator, seed_point, heading: float, p: SimParams):
    """One branching process: a trunk through `seed_point` plus Poisson(`branches`) side branches.

    **Returns:** `(trunk, branches)`: point arrays `(n, 2)`, the trunk first.
    """
    length = p.dendrite_length * max(p.shape) * rng.uniform(0.5, 1.5)
    back = _walk(rng, seed_point, heading + np.pi, length / 2, p.shape, p.curvature)
    fwd = _walk(rng, seed_point, heading, length / 2, p.shape, p.curvature)
    trunk = np.vstack([back[::-1], fwd[1:]])
    branches = []
    for _ in range(rng.poisson(p.branches)):
        if trunk.shape[0] < 8:
            break
        i = rng.integers(2, trunk.shape[0] - 2)
        d = trunk[i + 2] - trunk[i - 2]
        local = math.atan2(d[0], d[1])
        turn = rng.uniform(np.deg2rad(25), np.deg2rad(60)) * rng.choice([-1.0, 1.0])
        branch = _walk(rng, trunk[i], local + turn, length * rng.uniform(0.15, 0.4), p.shape, p.curvature)
        if branch.shape[0] > 4:
            branches.append(branch)
    return trunk, branches


def _dendrite_footprints(rng: np.random.Generator, p: SimParams):
    """Process footprints and branch-local footprints.

    **Returns:** `(A, parent)`: `A` `(K, H, W)` with the `n_neurons` whole processes first, then one footprint per
    side branch (when `branch_event_ratio > 0`); `parent` `(K,)` the process of each.
    """
    H, W = p.shape
    n = int(p.n_neurons)
    n_cross = int(round(p.overlap * n)) if n > 1 else 0
    trunks, whole, local, local_parent = [], [], [], []
    for k in range(n):
        if k >= n - n_cross and trunks:
            # cross an earlier trunk: start on one of its points, heading 60-120 degrees to it
            j = rng.integers(0, len(trunks))
            t = trunks[j]
            i = rng.integers(2, t.shape[0] - 2) if t.shape[0] > 4 else 0
            d = t[min(i + 2, t.shape[0] - 1)] - t[max(i - 2, 0)]
            heading = math.atan2(d[0], d[1]) + rng.uniform(np.deg2rad(60), np.deg2rad(120))
            seed_point = t[i]
        else:
            seed_point = rng.uniform([0, 0], [H - 1, W - 1])
            heading = rng.uniform(0, 2 * np.pi)
        trunk, branches = _process(rng, seed_point, heading, p)
        trunks.append(trunk)
        width = rng.uniform(*p.dendrite_width)
        whole.append(_unit_max(_draw_path(np.vstack([trunk, *branches]), width, p.shape)))
        if p.branch_event_ratio > 0:
            for br in branches:
                local.append(_unit_max(_draw_path(br, width, p.shape)))
                local_parent.append(k)
    A = np.stack(whole + local)
    parent = np.concatenate([np.arange(n), np.asarray(local_parent, int)]).astype(np.int64)
    return A, parent


def _centers_of_mass(A: np.ndarray) -> np.ndarray:
    """Centre of mass (row, col) of each footprint, `(K, 2)`."""
    K, H, W = A.shape
    mass = A.reshape(K, -1).sum(1)
    rows = A.sum(2) @ np.arange(H)
    cols = A.sum(1) @ np.arange(W)
    return np.stack([rows / mass, cols / mass], 1)


# --------------------------------------------------------------------------------------------------------------------
# Background, neuropil, motion
# --------------------------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """A smooth random field scaled to [0, 1] (Gaussian-filtered white noise)."""
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (x - x.min()) / max(x.max() - x.min(), 1e-12)


def _slow_trace(rng: np.random.Generator, n_frames: int, sigma_frames: float) -> np.ndarray:
    """A slow zero-mean, unit-standard-deviation trace (Gaussian-filtered white noise)."""
    z = ndimage.gaussian_filter1d(rng.standard_normal(n_frames), sigma_frames, mode="reflect")
    z -= z.mean()
    return z / max(z.std(), 1e-12)


def _background(rng: np.random.Generator, cells: np.ndarray, p: SimParams):
    """The smooth background (rank 1 or 2): a vignetted field plus the cells' resting fluorescence, slow traces.

    **Arguments:** `cells` `(H, W)` sum of the whole-cell footprints (for the resting fluorescence).
    **Returns:** `(b, f)`: `(rank, H, W)`, `(rank, T)`, non-negative, `f` about 1.
    """
    H, W = p.shape
    T = int(p.n_frames)
    yy, xx = np.mgrid[0:H, 0:W]
    r2 = ((yy - (H - 1) / 2) / H) ** 2 + ((xx - (W - 1) / 2) / W) ** 2
    vignette = 1 - 0.6 * r2  # 0.7 .. 1 over the field
    field = 0.7 + 0.6 * _smooth_field(rng, p.shape, max(H, W) / 8)
    b0 = field * vignette
    b0 = p.background_level * (b0 / b0.mean() + p.resting_brightness * cells)
    sigma_t = p.background_timescale * p.fps
    bleach = (1 - p.bleaching) ** (np.arange(T) / max(T - 1, 1))
    f0 = np.exp(0.05 * _slow_trace(rng, T, sigma_t)) * bleach
    b, f = [b0], [f0]
    if p.background_rank == 2:
        b.append(p.background_level * 0.5 * _smooth_field(rng, p.shape, max(H, W) / 5))
        f.append(np.exp(0.3 * _slow_trace(rng, T, sigma_t) - 0.045))
    return np.stack(b), np.stack(f)


def _neuropil(rng: np.random.Generator, g: np.ndarray, n_burn: int, p: SimParams):
    """The neuropil: a smooth field times the pooled, smoothed calcium of 200 out-of-focus cells (mean 1).

    **Returns:** `(b, f)`: `(H, W)` with mean `neuropil * background_level`, and `(T,)` with mean 1.
    """
    H, W = p.shape
    T = int(p.n_frames)
    field = 0.5 + _smooth_field(rng, p.shape, max(H, W) / 6)
    b = p.neuropil * p.background_level * field / field.mean()
    rates = _event_rates(rng, p.spike_rate, p.rate_cv, 200)
    S = _spike_train(rng, rates, n_burn + T, p).sum(0, keepdims=True)
    pool = _calcium(S, g[None])[0, n_burn:]
    pool = ndimage.gaussian_filter1d(pool, 0.25 * p.fps, mode="reflect")
    f = pool / pool.mean() if pool.mean() > 0 else np.ones(T)
    return b, f


# --------------------------------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------------------------------


def simulate(params: SimParams | None = None, *, seed: int = 0, **overrides) -> tuple[np.ndarray, Truth]:
    """Simulate a two-photon calcium-imaging movie and its ground truth.

    Deterministic: the same `seed` and knobs give a bit-identical movie and truth. Each part (cells, activity,
    background, neuropil, motion, noise) draws from its own random stream, so e.g. changing `peak_snr` rescales the
    same noise and changing `noise` or `motion_px` leaves the cells and their activity unchanged.

    **Arguments:**

    - `params`: a `SimParams` (defaults when None).
    - `seed`: the random seed (a non-negative int).
    - `**overrides`: knobs of `SimParams` replacing those of `params`, e.g. `simulate(n_neurons=10, peak_snr=3)`.

    **Returns:** `(movie, truth)`: the movie, float32 `(T, H, W)`, and its `Truth`.

    **Raises:** `ParameterError` for an unknown or invalid knob, a crowded field, or a movie where no neuron fires
    (peak SNR undefined).
    """
    p = _params(params, overrides)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"simulate: seed={seed!r} is invalid: give a non-negative integer")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)]
    rng_cells, rng_spikes, rng_bg, rng_np, rng_motion, rng_noise = streams
    T = int(p.n_frames)

    # cells
    if p.mode == "soma":
        A = _soma_footprints(rng_cells, p)
        parent = np.arange(A.shape[0], dtype=np.int64)
    else:
        A, parent = _dendrite_footprints(rng_cells, p)
    K = A.shape[0]
    whole = parent == np.arange(K)

    # activity: per-cell kinetics, spikes (with a burn-in so frame 0 is in steady state), calcium
    g_cells = _kinetics(rng_spikes, int(whole.sum()), p)
    g = g_cells[parent]
    n_burn = int(math.ceil(5 * p.tau_decay * (1 + 3 * p.tau_jitter) * p.fps))
    rates = _event_rates(rng_spikes, p.spike_rate, p.rate_cv, int(whole.sum()))
    rates = np.concatenate([rates, p.branch_event_ratio * rates[parent[~whole]]])
    brightness = _lognormal(rng_spikes, p.brightness_cv, int(whole.sum()))[parent]
    peaks = np.array([_kernel_peak(gk, n_burn + 10) for gk in g])
    S_full = _spike_train(rng_spikes, rates, n_burn + T, p)
    S_full *= (p.background_level * p.spike_amplitude * brightness / peaks)[:, None]
    C = _calcium(S_full, g)[:, n_burn:].astype(np.float32)
    S = S_full[:, n_burn:].astype(np.float32)

    # background (+ neuropil as the last component)
    b, f = _background(rng_bg, A[whole].sum(0), p)
    neuropil_index = -1
    if p.neuropil > 0:
        b_np, f_np = _neuropil(rng_np, _ar_coefficients(p.tau_decay, p.tau_rise, p.fps), n_burn, p)
        b, f = np.concatenate([b, b_np[None]]), np.concatenate([f, f_np[None]])
        neuropil_index = b.shape[0] - 1
    b, f = b.astype(np.float32), f.astype(np.float32)

    # motion
    shifts = np.zeros((T, 2), np.float32)
    if p.motion_px > 0:
        shifts = (p.motion_px * rng_motion.standard_normal((T, 2))).astype(np.float32)

    # noise-free movie, then noise scaled to the requested peak SNR
    movie = _render(A, C, b, f, shifts, 0, T)
    mean_image = movie.mean(0, dtype=np.float64)
    var_unit = mean_image + p.read_noise_ratio * np.median(mean_image)  # noise variance per unit gain
    gain = _gain_for_peak_snr(A[whole], C[whole], var_unit, p.peak_snr)
    sn = np.sqrt(gain * var_unit)
    read_sd = math.sqrt(gain * p.read_noise_ratio * np.median(mean_image))
    n_clipped = _add_noise(movie, rng_noise, sn, read_sd, gain, p)
    if p.quantize:
        sn = np.sqrt(sn**2 + 1.0 / 12.0)

    info = dict(p.to_dict(), seed=int(seed), gain=float(gain), neuropil_index=int(neuropil_index),
                n_clipped=int(n_clipped), n_burn_frames=n_burn, version=__version__)
    truth = Truth(
        A=A, C=C, S=S, b=b, f=f, sn=sn.astype(np.float32), g=g.astype(np.float32),
        centers=_centers_of_mass(A).astype(np.float32), shifts=shifts, parent=parent,
        offset=float(p.offset), fps=float(p.fps), params=info,
    )  # fmt: skip
    return movie, truth


def _params(params: SimParams | None, overrides: dict) -> SimParams:
    """`params` (or the defaults) with `overrides` applied; unknown names raise `ParameterError`."""
    if params is not None and not isinstance(params, SimParams):
        raise ParameterError(f"simulate: params must be a SimParams, got {type(params).__name__}")
    known = {f.name for f in dataclasses.fields(SimParams)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(f"simulate: unknown knob(s) {unknown}; the knobs are {sorted(known)}")
    return dataclasses.replace(params or SimParams(), **overrides)


def _gain_for_peak_snr(A: np.ndarray, C: np.ndarray, var_unit: np.ndarray, target: float) -> float:
    """The gain that makes the median peak SNR of the firing cells equal `target` (see `SimParams.peak_snr`).

    With noise sd `sqrt(gain * var_unit)`, cell k's peak SNR is `max_t C_k / sqrt(gain var_unit[i_k])`, so the median
    scales as `gain ** -0.5` and the gain follows in closed form.
    """
    K = A.shape[0]
    brightest = A.reshape(K, -1).argmax(1)
    peak = C.max(1).astype(np.float64) * A.reshape(K, -1)[np.arange(K), brightest]
    fired = peak > 0
    if not fired.any():
        raise ParameterError(
            "simulate: no neuron fired, so the peak SNR is undefined; raise spike_rate or n_frames"
        )
    snr_at_unit_gain = peak[fired] / np.sqrt(var_unit.ravel()[brightest[fired]])
    return float((np.median(snr_at_unit_gain) / target) ** 2)


def _add_noise(movie: np.ndarray, rng: np.random.Generator, sn: np.ndarray, read_sd: float, gain: float,
               p: SimParams) -> int:
    """Add noise (and the offset, and rounding) to the noise-free `movie` in place, chunk by chunk.

    Gaussian: `F + sn * N(0, 1)`. Poisson-Gaussian: `gain * Poisson(F / gain) + read_sd * N(0, 1)`.
    Each chunk of `_CHUNK` frames draws from its own child stream, so the noise does not depend on memory settings.
    **Returns:** the number of samples clipped to the uint16 range (0 unless `quantize`).
    """
    T = movie.shape[0]
    sn32 = sn.astype(np.float32)
    n_chunks = -(-T // _CHUNK)
    children = rng.bit_generator.seed_seq.spawn(n_chunks)
    n_clipped = 0
    for i, t0 in enumerate(range(0, T, _CHUNK)):
        r = np.random.default_rng(children[i])
        t1 = min(t0 + _CHUNK, T)
        F = movie[t0:t1]
        if p.noise == "gaussian":
            F += sn32 * r.standard_normal(F.shape, dtype=np.float32)
        else:
            photons = r.poisson(np.maximum(F, 0) / gain).astype(np.float32)
            F[...] = np.float32(gain) * photons + np.float32(read_sd) * r.standard_normal(F.shape, dtype=np.float32)
        if p.offset:
            F += np.float32(p.offset)
        if p.quantize:
            np.rint(F, out=F)
            n_clipped += int(np.count_nonzero((F < 0) | (F > _UINT16_MAX)))
            np.clip(F, 0, _UINT16_MAX, out=F)
    return n_clipped


# --------------------------------------------------------------------------------------------------------------------
# Measurements on a truth
# --------------------------------------------------------------------------------------------------------------------


def peak_snr(truth: Truth) -> np.ndarray:
    """Each component's peak SNR: `max_t a_k[i_k] C_k[t] / sn[i_k]` at its brightest pixel `i_k`, `(K,)` float64.

    The median over the whole cells (`truth.parent == k`) that fire equals the requested `SimParams.peak_snr`.
    """
    K = truth.A.shape[0]
    flat = truth.A.reshape(K, -1)
    brightest = flat.argmax(1)
    peak = truth.C.max(1).astype(np.float64) * flat[np.arange(K), brightest]
    return peak / truth.sn.ravel()[brightest].astype(np.float64)


# --------------------------------------------------------------------------------------------------------------------
# Truth files
# --------------------------------------------------------------------------------------------------------------------


def truth_path_for(movie_path: str | os.PathLike) -> Path:
    """The truth file that goes with a movie: `movie.tif` -> `movie_truth.npz` (same folder; `f.h5:/ds` -> `f_truth.npz`)."""
    s = str(movie_path)
    if ":" in s and not Path(s).exists():
        head, _, _ = s.rpartition(":")
        if head.lower().endswith((".h5", ".hdf5")):
            s = head
    path = Path(s)
    return path.with_name(path.stem + "_truth.npz")


def save_truth(path: str | os.PathLike, truth: Truth) -> Path:
    """Write a truth to `.npz` atomically: its arrays under their names, plus `fps`, `offset` and `params` (JSON).

    **Arguments:**

    - `path`: the `.npz` file to write (its folder must exist); an existing file is replaced only by a complete one.
    - `truth`: the `Truth` returned by `simulate`.

    **Returns:** the path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ResultFileError(f"save_truth: {path} must end in .npz (the truth is written as a numpy archive)")
    if not path.parent.exists():
        raise ResultFileError(f"save_truth: the folder {path.parent} does not exist; create it first")
    arrays = truth.arrays()
    extra = dict(fps=np.float64(truth.fps), offset=np.float64(truth.offset), params=np.array(json.dumps(truth.params)))
    from .io import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays, **extra)
    return path


def load_truth(path: str | os.PathLike) -> Truth:
    """Read a truth written by `save_truth` (identical arrays).

    **Arguments:**

    - `path`: a `.npz` file written by `save_truth` (or `jaxcnmf simulate`, as `<movie stem>_truth.npz`).

    **Returns:** the `Truth`. Raises `ResultFileError` naming what is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"load_truth: {path} does not exist; simulate one with `jaxcnmf simulate -o movie.tif`")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zip/npy format errors come in many types
        raise ResultFileError(f"load_truth: {path} is not a readable .npz truth file ({e}); write it again") from e
    missing = [k for k in (*Truth.ARRAYS, "fps", "offset", "params") if k not in data]
    if missing:
        raise ResultFileError(f"load_truth: {path} lacks {missing}; it was not written by jaxcnmf's save_truth")
    return Truth(
        **{k: data[k] for k in Truth.ARRAYS},
        offset=float(data["offset"]), fps=float(data["fps"]), params=json.loads(str(data["params"])),
    )  # fmt: skip


def _summary(truth: Truth) -> dict[str, Any]:
    """A short description of a truth, for printing."""
    T, H, W = truth.shape
    snr = peak_snr(truth)[(truth.parent == np.arange(truth.parent.size)) & (truth.C.max(1) > 0)]
    return dict(
        frames=T, height=H, width=W, components=int(truth.A.shape[0]), cells=truth.n_neurons,
        background=int(truth.b.shape[0]), median_peak_snr=round(float(np.median(snr)), 3) if snr.size else None,
    )  # fmt: skip
