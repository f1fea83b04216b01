"""The CNMF fit: `Params` (one frozen set of knobs, defaults derived from the data) and `fit`, which composes the stages.

It sits on top of the pipeline: movie (io) -> noise -> init -> [spatial -> background -> temporal -> merge] x n_iter ->
quality -> `Result`. Every stage is a public function of its own module; `fit` only wires them together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._version import __version__
from .errors import MovieError, ParameterError
from .result import Result

DEFAULT_FPS = 30.0  # a nominal frame rate for callers that need one when the true rate is unknown (not used by fit)


@dataclasses.dataclass(frozen=True)
class Params:
    """Everything `fit` can be told; only `neuron_radius` is required, the rest has defaults derived from the data.

    **Fields** (with the CaImAn parameter each one replaces):

    - `neuron_radius`: expected soma radius in pixels (CaImAn `gSig`, which is about the radius). Sets the blur and
      window of the greedy initialisation and the size of the spatial search areas.
    - `fps`: frame rate in Hz (CaImAn `fr`). Kinetics are estimated from the data in frames, so `fps` only enters
      the quality rule's time scales (how many frames a transient must last; frame-count defaults when unknown) and
      the result's metadata (`Result.params["fps"]` stays `None` when unknown; scoring then bins spikes per frame).
    - `K`: optional upper bound on the number of components (CaImAn `K`); by default the initialisation stops by itself
      when a new component no longer explains more than noise, with `default_max_components` (half the field tiled
      by neuron discs) as a safeguard against runaway initialisations on unusual data (the progress line says so
      when that bound is reached).
    - `p`: order of the AR model of the calcium (CaImAn `p`): 1 (instant rise) or 2 (rise and decay).
    - `nb`: number of background components (CaImAn `gnb`).
    - `merge_thr`: trace correlation above which overlapping components are merged (CaImAn `merge_thr`).
    - `mixture_thr`: a component whose trace is explained (variance fraction above this) by a non-negative
      combination of the traces of the components overlapping it is a mixture of its neighbours and is dropped
      between iterations (`merge.mixture_components`; no CaImAn equivalent; 1 disables it). The weaker of two
      components with the same footprint (cosine >= `merge.DUPLICATE_COS`) is dropped at the same points
      (`redundant_components`).
    - `min_snr`, `rval_thr`: the acceptance rule's thresholds on the trace SNR and the spatial correlation
      (CaImAn `min_SNR`, `rval_thr`); see `quality.evaluate_components` for the exact rule.
    - `n_iter`: outer iterations of spatial -> background -> temporal updates (merging between iterations). 2 by
      default: each iteration costs about a fifth of a fit, and a third one (the default before) changed little
      once the final mixture check existed: simulated 256x256x3000 (150 neurons) F1 0.952 / calcium corr 0.992 /
      spike corr 0.879 with 2 vs 0.952 / 0.992 / 0.886 with 3; 128x128x2000 (40) 0.95 / 0.993 / 0.864 vs
      0.95 / 0.994 / 0.870; neurofinder_tr F1 0.172 vs 0.145. On the 64x64x1000 movie of tests/test_fit.py two
      iterations keep one extra component that a third removes (13 for 12 neurons: F1 0.96 vs 1.0); pass
      `n_iter=3` for that last bit.
    - `init`: "greedy" (somata, CaImAn `method_init="greedy_roi"`) or "sparse_nmf" (dendrites/axons, CaImAn
      `method_init="sparse_nmf"`) or "dendrite" (dendrites/axons: `dendrites.dendrite_init`, event-triggered sparse
      rank-1 components found until no event is left above the noise; `neuron_radius` is then the process width in
      pixels); "sparse_nmf" and "dendrite" also make the spatial update non-compact (search areas follow each
      footprint's shape, no clean-up to one connected blob).
    - `tsub`: frames averaged per bin for the greedy initialisation (CaImAn `tsub`); None (default) bins by 0.2 s
      of frames when `fps` is given, at least the frames its peak score averages (3, or 0.1 s of frames), while at
      least 200 bins remain (`init.default_tsub`); 1 turns binning off. The updates after it always use every frame.
    - `spatial_method`: "hals" (default: non-negative least squares by HALS sweeps on each search area) or
      "constrained" (per-pixel noise-constrained sparse fit). HALS is the default since the greedy init finds the dim
      cells of real recordings: on neurofinder_tr the constrained fit breaks their footprints into speckles that no
      longer match the labels (P 0.07, R 0.13 vs P 0.11, R 0.20 with HALS), while on simulated movies both are as
      accurate (README example: F1 0.964 constrained, 0.976 HALS).
    - `footprint_median`: size in pixels of the median filter applied to every footprint after each spatial update
      (`spatial.cleanup_footprints`; CaImAn `medw`); None (default) is 3 for somata (`init="greedy"`) and 1 (none)
      for dendrites and axons, whose processes a median would erase. A least-squares footprint of a dim cell is
      speckled by the pixels' noise; the median keeps it one blob. Measured on neurofinder_tr: P 0.109 R 0.204 F1
      0.142 without, P 0.129 R 0.222 F1 0.163 with (median pieces of a footprint above 20 % of its peak: 6 -> 1);
      simulated 128x128x2000 (40 neurons, two seeds) F1 0.964 / 0.938 -> 0.976 / 0.938, spike corr 0.902 / 0.857
      -> 0.892 / 0.858; with the duplicate check of `mixture_thr`'s entry added too, 256x256x3000 (150 neurons)
      F1 0.964 -> 0.970, calcium corr 0.992 -> 0.992, spike corr 0.882 -> 0.886.
    - `temporal_sweeps`: block-coordinate sweeps per temporal update (CaImAn `ITER`).
    - `temporal_groups`: how the temporal update visits the components. "disjoint" (default; MATH.md, CaImAn):
      groups of components whose footprints do not overlap, deconvolved one group after another, each seeing the
      traces the groups before it just got (Gauss-Seidel block-coordinate descent: every group's update is exact
      given the others, so the objective never rises). "all": every component at once from the same traces
      (Jacobi; one batched deconvolution per update, which suits a GPU). Overlapping components then both answer
      to the same residual, so a cell fitted twice gets two alike traces that the duplicate and merge checks
      catch, where in sequence the first takes the signal and the second keeps a weak remainder. Measured
      (2026-12-08, 2-core box, four simulated 256x256x3000 movies of 150 neurons, peak SNR 3-5): F1 0.970 / 0.983
      / 0.963 / 0.968 with "disjoint" and 0.980 / 0.987 / 0.966 / 0.977 with "all" (1-4 fewer false components
      each, calcium and spike correlations within +-0.004), neurofinder_tr F1 0.163 and 0.164, and the warm fit
      ~5 % faster on the CPU (median 7.96-8.63 vs 8.44-9.05 s). No descent guarantee: a pair that overlaps
      strongly may take a few more iterations to settle.
    - `background_iter`: HALS iterations per background update.
    - `s_min`: minimum spike size for the deconvolution (CaImAn `s_min`); 0 for the plain l1 problem.
    - `lam`: fixed sparsity weight of the deconvolution; `None` (default) meets each trace's noise constraint.
    - `seed`: seed of every random choice (the fit is deterministic for a fixed seed).
    - `chunk_frames`: frames per chunk when streaming the movie for the noise estimate.
    - `nonfinite`: "raise" (default: NaN/inf frames are an error) or "repair" (interpolated by `io.open_movie`).
    """

    neuron_radius: float
    fps: float | None = None
    K: int | None = None
    p: int = 2
    nb: int = 1
    merge_thr: float = 0.85
    mixture_thr: float = 0.8
    min_snr: float = 2.5
    rval_thr: float = 0.8
    n_iter: int = 2
    init: str = "greedy"
    tsub: int | None = None
    spatial_method: str = "hals"
    footprint_median: int | None = None
    temporal_sweeps: int = 1
    temporal_groups: str = "disjoint"
    background_iter: int = 3
    s_min: float = 0.0
    lam: float | None = None
    seed: int = 0
    chunk_frames: int = 1000
    nonfinite: str = "raise"

    def __post_init__(self):
        check_params(self)

    def to_dict(self) -> dict:
        """The parameters as a JSON-able dict (what `Result.params` stores)."""
        return dataclasses.asdict(self)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def check_params(prm: Params) -> None:
    """Raise `ParameterError` naming the first parameter that is out of range (movie-independent checks only).

    **Arguments:**

    - `prm`: the parameters.

    **Returns:** nothing.
    """
    def bad(name, why):
        raise ParameterError(f"{name}={getattr(prm, name)!r}: {why}")

    if prm.neuron_radius is None:
        bad("neuron_radius", "the neuron radius in pixels is required (e.g. 4 for a 2-photon soma at 1 um/px); "
                             "measure a typical cell on the mean image")
    if not _is_real(prm.neuron_radius) or prm.neuron_radius <= 0:
        bad("neuron_radius", "expected a positive number of pixels")
    if prm.fps is not None and (not _is_real(prm.fps) or prm.fps <= 0):
        bad("fps", "expected a positive frame rate in Hz, or None when unknown")
    if prm.K is not None and (not _is_int(prm.K) or prm.K < 1):
        bad("K", "expected a positive integer upper bound on the number of components, or None")
    if prm.p not in (1, 2) or isinstance(prm.p, bool):
        bad("p", "the AR order must be 1 or 2")
    if not _is_int(prm.nb) or prm.nb < 1:
        bad("nb", "expected at least one background component")
    if not _is_real(prm.merge_thr) or not -1 <= prm.merge_thr <= 1:
        bad("merge_thr", "expected a correlation in [-1, 1] (use 1 to disable merging)")
    if not _is_real(prm.mixture_thr) or not 0 <= prm.mixture_thr <= 1:
        bad("mixture_thr", "expected a fraction of variance in [0, 1] (use 1 to keep mixtures)")
    for name in ("min_snr", "rval_thr", "s_min"):
        if not _is_real(getattr(prm, name)):
            bad(name, "expected a finite number")
    for name in ("n_iter", "temporal_sweeps", "background_iter", "chunk_frames"):
        if not _is_int(getattr(prm, name)) or getattr(prm, name) < 1:
            bad(name, "expected a positive integer")
    if prm.footprint_median is not None and (not _is_int(prm.footprint_median) or prm.footprint_median < 1
                                             or prm.footprint_median % 2 == 0):
        bad("footprint_median", "expected None (3 for somata, 1 for dendrites) or an odd number of pixels >= 1 "
                                "(1: no median filter)")
    if prm.tsub is not None and (not _is_int(prm.tsub) or prm.tsub < 1):
        bad("tsub", "expected None (binned as the data suggest) or a positive integer number of frames per bin")
    if prm.init not in ("greedy", "sparse_nmf", "dendrite"):
        bad("init", 'expected "greedy", "sparse_nmf" or "dendrite"')
    if prm.spatial_method not in ("constrained", "hals"):
        bad("spatial_method", 'expected "constrained" or "hals"')
    if prm.temporal_groups not in ("disjoint", "all"):
        bad("temporal_groups", 'expected "disjoint" (groups of non-overlapping components in turn) or "all"')
    if prm.lam is not None and (not _is_real(prm.lam) or prm.lam < 0):
        bad("lam", "expected None (noise-constrained) or a non-negative sparsity weight")
    if not _is_int(prm.seed):
        bad("seed", "expected an integer")
    if prm.nonfinite not in ("raise", "repair"):
        bad("nonfinite", 'expected "raise" or "repair"')


def make_params(neuron_radius=None, *, fps=None, K=None, params: Params | None = None, **overrides) -> Params:
    """Build `Params` from `fit`'s arguments: `params` (if given) updated by the explicit arguments and `overrides`.

    **Arguments:**

    - `neuron_radius`, `fps`, `K`: as in `Params`; `None` keeps the value from `params`.
    - `params`: a starting `Params`.
    - `overrides`: any other `Params` field by name.

    **Returns:** a validated `Params` (raises `ParameterError` on an unknown name or a bad value).
    """
    fields = {f.name for f in dataclasses.fields(Params)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ParameterError(f"unknown fit parameter(s) {unknown}; valid ones are {sorted(fields)}")
    kw = {} if params is None else dataclasses.asdict(params)
    kw.update(overrides)
    for name, value in (("neuron_radius", neuron_radius), ("fps", fps), ("K", K)):
        if value is not None:
            kw[name] = value
    kw.setdefault("neuron_radius", None)
    return Params(**kw)


def footprint_median(prm: Params) -> int:
    """The median filter size `cleanup_footprints` gets: `prm.footprint_median`, or by default 3 for somata
    (`init="greedy"`) and 1 for the shape-following inits (dendrites, axons)."""
    if prm.footprint_median is not None:
        return int(prm.footprint_median)
    return 3 if prm.init == "greedy" else 1


def min_frames(prm: Params) -> int:
    """The shortest movie `fit` accepts: enough frames for the AR(p) fit and the noise spectrum (max(10 p, 20))."""
    return max(10 * prm.p, 20)


def check_movie_shape(shape: tuple[int, int, int], prm: Params, name: str) -> None:
    """Raise `MovieError`/`ParameterError` when the movie is too short or the neuron radius does not fit the field.

    **Arguments:**

    - `shape`: `(T, H, W)` of the movie; `prm`: the parameters; `name`: how to call the movie in messages.

    **Returns:** nothing.
    """
    T, H, W = shape
    if T < min_frames(prm):
        raise MovieError(f"{name}: {T} frames is too short to fit; need at least {min_frames(prm)} frames "
                         f"(10 per AR order p={prm.p}, and enough for the noise spectrum)")
    if 2 * prm.neuron_radius + 1 > min(H, W):
        raise ParameterError(f"neuron_radius={prm.neuron_radius!r}: a neuron of this radius does not fit in the "
                             f"{H}x{W} field of view; give the radius in pixels (it must be below {(min(H, W) - 1) / 2})")
    if prm.tsub is not None and prm.tsub > max(1, T // 3):
        raise ParameterError(f"tsub={prm.tsub!r}: bins of {prm.tsub} frames leave fewer than 3 of the {T} frames of "
                             f"{name}; use at most {max(1, T // 3)} (or None)")


class Progress:
    """A plain text progress report on stderr: one line per finished stage with its elapsed time (or silent)."""

    def __init__(self, enabled: bool, n_stages: int):
        self.enabled = enabled
        self.n = n_stages
        self.i = 0
        self.t0 = self.t = time.perf_counter()
        self.times: dict[str, float] = {}

    def done(self, stage: str, info: str = "") -> None:
        now = time.perf_counter()
        self.i += 1
        self.times[stage] = self.times.get(stage, 0.0) + now - self.t
        if self.enabled:
            width = 20
            filled = min(width, round(width * self.i / max(self.n, 1)))
            bar = "#" * filled + "." * (width - filled)
            print(f"[{bar}] {stage:<24s} {now - self.t:6.1f} s  (total {now - self.t0:6.1f} s) {info}",
                  file=sys.stderr, flush=True)
        self.t = now


def center_of_mass(A: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre of mass (row, col) of each footprint.

    **Arguments:**

    - `A`: `(d, K)` non-negative footprints, row-major pixels, dense or `scipy.sparse`; `shape`: `(H, W)`.

    **Returns:** `(K, 2)` float array (NaN for an all-zero footprint).
    """
    import scipy.sparse

    H, W = shape
    A = scipy.sparse.csc_matrix(A, dtype=np.float64) if scipy.sparse.issparse(A) else np.asarray(A, np.float64)
    rows, cols = np.divmod(np.arange(H * W), W)
    mass = np.asarray(A.sum(axis=0)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([A.T @ rows / mass, A.T @ cols / mass], axis=1)


def empty_result(shape: tuple[int, int, int], prm: Params, sn: np.ndarray | None = None,
                 b: np.ndarray | None = None, f: np.ndarray | None = None, dtype=np.float32) -> Result:
    """The documented result for a movie without any component (e.g. all zero): `K = 0`, background as given or zero.

    **Arguments:**

    - `shape`: `(T, H, W)`; `prm`: parameters; `sn`: `(H, W)` noise (zeros if `None`); `b`, `f`: `(d, nb)`,
      `(nb, T)` background (zeros if `None`).

    **Returns:** a `Result` with zero components.
    """
    T, H, W = shape
    z = lambda *s: np.zeros(s, dtype)  # noqa: E731
    b = z(H * W, prm.nb) if b is None else np.asarray(b, dtype)
    f = z(prm.nb, T) if f is None else np.asarray(f, dtype)
    return Result(
        A=z(0, H, W), C=z(0, T), S=z(0, T), b=b.T.reshape(-1, H, W), f=f,
        sn=z(H, W) if sn is None else np.asarray(sn, dtype), g=z(0, prm.p), YrA=z(0, T),
        baseline=z(0), c1=z(0), lam=z(0), snr=z(0), r_value=z(0), accepted=np.zeros(0, bool),
        centers=z(0, 2), params=prm.to_dict(), version=__version__,
    )


def _select(idx, *arrays):
    """Keep the components `idx` of per-component arrays (axis 0), `None` passing through."""
    return tuple(None if x is None else x[idx] for x in arrays)


def fit(movie: Any, neuron_radius: float | None = None, *, fps: float | None = None, K: int | None = None,
        params: Params | None = None, progress: bool = False, **overrides) -> Result:
    """Fit CNMF to a movie: find the neurons, their footprints, denoised calcium, spikes and the background.

    Pipeline (each stage a public function): per-pixel noise (`noise.estimate_noise_movie`) -> initialisation
    (`init.greedy_init`, or `init.sparse_nmf_init` with `init="sparse_nmf"`) -> `n_iter` times [footprints
    (`spatial.update_spatial`, then `spatial.cleanup_footprints`) -> background (`background.update_background`) ->
    traces and kinetics (`temporal.update_temporal`) -> between iterations, removal of mixtures of neighbours and of
    duplicate footprints (`redundant_components`) and merging of split components (`merge.merge_components`), so
    the last traces are freshly deconvolved)] -> a last such check (with a temporal refit of the neighbours when one
    is dropped) -> quality (`quality.evaluate_components`).
    Empty or degenerate components (zero footprint or trace, non-finite values) are dropped after every stage.
    Inputs are checked before any heavy work. Deterministic for a fixed `seed`.

    **Arguments:**

    - `movie`: a `(T, H, W)` array, a path (TIFF, folder of TIFFs, .npy, .h5:/dataset) or an `io.MovieSource`.
      A finite float32 numpy array is read in place (never written); anything else is read once into memory and
      that copy is freed as soon as the fit's `(pixels, frames)` copy exists.
    - `neuron_radius`: expected soma radius in pixels (required, here or in `params`).
    - `fps`: frame rate in Hz, optional (see `Params.fps`).
    - `K`: optional upper bound on the number of components.
    - `params`: a `Params` to start from; `neuron_radius`, `fps`, `K` and `overrides` (any `Params` field) win.
    - `progress`: print one line per stage with elapsed times to stderr.

    **Returns:** a `Result` with ALL components kept, ordered accepted first (each part by decreasing SNR), with
    `accepted`, `snr` and `r_value` per component; footprints `A` `(K, H, W)` have unit l2 norm. A movie with no
    signal (e.g. all zero) gives a `Result` with `K = 0` rather than an error. `params` holds the parameters used
    and `params["timings"]`, seconds per stage (metadata: only the arrays are reproducible bit for bit).

    Raises `ParameterError` (bad parameter, radius that does not fit the field) or `MovieError` (unreadable movie,
    too few frames, non-finite values with `nonfinite="raise"`) before any fitting.

    The first call in a process turns on JAX's persistent compilation cache in `~/.cache/jaxcnmf/xla` (compiled
    programs are reused by later processes: a later first fit skips most of its compilation); set the environment
    variable `JAXCNMF_CACHE_DIR` to another folder, or to `""` to turn it off. A cache folder already given to JAX
    is kept (see `_cache.enable_compilation_cache`).
    """
    from ._cache import enable_compilation_cache
    from .io import open_movie

    enable_compilation_cache()
    prm = make_params(neuron_radius, fps=fps, K=K, params=params, **overrides)
    source = open_movie(movie, nonfinite=prm.nonfinite, min_frames=1)
    name = source.path or "movie"
    check_movie_shape(tuple(source.shape), prm, name)
    T, H, W = source.shape
    prog = Progress(progress, n_stages=5 + 4 * prm.n_iter)

    with _small_pages():
        Y = _read_whole(movie, source)
    prog.done("read movie", f"{T} frames of {H}x{W}")
    lo, hi = _frame_range(Y, source)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):  # io guarantees it: a second guard
        raise MovieError(f"{name}: the movie holds NaN or infinite values; pass nonfinite='repair' to interpolate them")
    if float(lo.min()) == float(hi.max()):
        return empty_result((T, H, W), prm)
    owned = [Y]
    del Y  # `_fit_owned` drops the (T, H, W) movie once it has the (pixels, frames) copy
    result = _fit_owned(owned, prm, prog)
    # Seconds per stage, for reports. Only metadata: the arrays are what is reproducible, bit for bit.
    timings = {stage: round(sec, 3) for stage, sec in prog.times.items()}
    return Result(**result.arrays(), params={**result.params, "timings": timings}, version=result.version)


def _read_whole(movie, source) -> np.ndarray:
    """The whole movie as a float32 (T, H, W) numpy array: the caller's own array when it already is one and holds
    only finite values (the fit never writes to it, so a copy would only double the memory), else `source.read()`."""
    clean = source.nonfinite_frames is not None and len(source.nonfinite_frames) == 0
    if isinstance(movie, np.ndarray) and movie.dtype == np.float32 and clean:
        return movie
    return np.asarray(source.read(), np.float32)


def _frame_range(Y: np.ndarray, source) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's minimum and maximum, `(T,)` each: those `open_movie`'s scan recorded when the source had no
    non-finite frame (`Y` is then the source's frames as float32, and casting keeps every frame's extremes), else
    two reductions of `Y` (a repaired movie)."""
    clean = source.nonfinite_frames is not None and len(source.nonfinite_frames) == 0
    if clean and source.frame_range is not None and len(source.frame_range[0]) == len(Y):
        return source.frame_range
    return Y.min(axis=(1, 2)), Y.max(axis=(1, 2))


def _aligned_empty(shape: tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
    """An uninitialised numpy array whose data starts on an `align`-byte boundary (XLA's CPU client can then use the
    memory in place rather than copying it)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.empty(n * dtype.itemsize + align, np.uint8)
    off = -raw.ctypes.data % align
    return raw[off : off + n * dtype.itemsize].view(dtype).reshape(shape)


_TRANSPOSE_TILE = 96  # side of the square tiles of `_transpose_into`


def _transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = _TRANSPOSE_TILE) -> None:
    """dst[...] = src.T, copied by square tiles of `tile` x `tile` (src (T, n), dst (n, T)).

    numpy copies a transposed view one destination row at a time, reading the source down a column: at a stride of
    a whole frame every element is a new cache line (and often a new page), and transposing a 256x256x3000 movie
    took 2.9 s. Tiles of 96 x 96 (36 kB) stay in the L1/L2 caches with few Python steps: 0.5-1.5 s on the same 2-core
    box (page faults of the fresh destination make most of the spread), the same values.
    """
    T, n = src.shape
    for p0 in range(0, n, tile):
        d, s = dst[p0 : p0 + tile], src[:, p0 : p0 + tile]
        for t0 in range(0, T, tile):
            d[:, t0 : t0 + tile] = s[t0 : t0 + tile].T


def _pixels_by_frames(Y, block: int = 1 << 22):
    """The (d, T) = (H*W, T) jax copy Yr of a (T, H, W) movie, built by blocks of pixels without other whole copies.

    On the CPU the jax array uses the numpy buffer filled here in place (no second copy); elsewhere it is moved to
    the device once.

    **Arguments:**

    - `Y`: `(T, H, W)` numpy (or jax) movie, possibly a strided view; `block`: elements per block of the
      transposition (whole image rows: at least one row per block).

    **Returns:** `Yr` `(H*W, T)` jax array of Y's dtype, pixels in row-major order.
    """
    from ._threads import thread_map

    T, H, W = Y.shape
    Yr = _aligned_empty((H * W, T), np.dtype(Y.dtype))
    rows = max(1, block // max(T * W, 1))  # blocks of image rows: only a block is copied, even from a strided view

    def one(r0):
        part = np.asarray(Y[:, r0 : r0 + rows]).reshape(T, -1)
        _transpose_into(Yr[r0 * W : r0 * W + part.shape[1]], part)

    # Blocks are copied by a thread per core (numpy releases the GIL while it copies): most of the time goes to the
    # first touch of the fresh (d, T) buffer's pages, which the kernel zeroes one fault at a time, and to the
    # strided reads; on 256x256x3000 (2 cores) 0.8-2.8 s with one thread, 0.6-1.6 s with two (the spread is the
    # kernel's page-fault and huge-page compaction time).
    thread_map(one, range(0, H, rows))
    try:
        return jax.device_put(Yr, may_alias=True)
    except TypeError:  # older jax without may_alias: one copy
        return jax.device_put(Yr)


def _stage_done(prog: Progress, stage: str, info: str = "", outputs=()) -> None:
    """End of a fit stage: wait for its `outputs` (jax dispatches asynchronously: without the wait a stage's time
    would show under the next one), release the freed heap, then report."""
    from .init import release_free_memory

    jax.block_until_ready(outputs)
    release_free_memory()
    prog.done(stage, info)


def fit_array(Y: np.ndarray, prm: Params, prog: Progress | None = None) -> Result:
    """The fit itself on a checked `(T, H, W)` float array (see `fit`, which validates and loads the movie first).

    **Arguments:**

    - `Y`: `(T, H, W)` finite movie; `prm`: validated parameters; `prog`: optional progress reporter.

    **Returns:** the `Result` described in `fit`.
    """
    return _fit_owned([Y], prm, prog)


@contextlib.contextmanager
def _small_pages():
    """numpy's advice for transparent huge pages on its large arrays turned off for the duration (restored after).

    numpy asks the kernel for huge pages on every array of 4 MB or more; where the kernel compacts memory on demand
    for such advice (`/sys/kernel/mm/transparent_hugepage/defrag` = madvise, this box's setting), the first touch of a
    fresh large array can stall: filling a fresh 786 MB array took 0.16-2.4 s with the advice and 0.28-0.31 s
    without, and the warm fit of simulated 256x256x3000 took 9.9-10.3 s with it and 9.3-9.6 s without (the
    initialisation 3.6-3.7 vs 3.2-3.3 s). A performance hint only: results do not change. A no-op where numpy has no
    such switch."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    get = getattr(multiarray, "_get_madvise_hugepage", None)
    set_ = getattr(multiarray, "_set_madvise_hugepage", None)
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(False)
    try:
        yield
    finally:
        set_(before)


def _fit_owned(owned: list, prm: Params, prog: Progress | None = None) -> Result:
    """`fit_array` on the movie held in the one-element list `owned`, which it empties: when the caller keeps no
    other reference, the (T, H, W) movie is freed as soon as its (pixels, frames) copy Yr exists (the fit's peak
    memory is then Yr and the stage's work, not two whole movies). Runs with numpy's huge-page advice off
    (`_small_pages`)."""
    with _small_pages():
        return _fit_stages(owned, prm, prog)


def _fit_stages(owned: list, prm: Params, prog: Progress | None = None) -> Result:
    """The body of `_fit_owned`."""
    Y = owned.pop()

    from .background import update_background
    from .init import greedy_init, sparse_nmf_init
    from .merge import merge_components
    from .noise import estimate_noise_movie
    from .quality import evaluate_components
    from .spatial import cleanup_footprints, update_spatial
    from .temporal import update_temporal

    prog = prog or Progress(False, 1)
    T, H, W = Y.shape
    d = H * W
    radius = float(prm.neuron_radius)
    compact = prm.init == "greedy"  # somata: disk search areas, one connected blob; dendrites: shape-following

    sn = np.asarray(estimate_noise_movie(Y, chunk_frames=prm.chunk_frames), np.float32)
    sn_flat = jnp.asarray(sn.reshape(d))
    _stage_done(prog, "noise", f"median sn {float(np.median(sn)):.3g}")

    key = jax.random.PRNGKey(prm.seed)
    k_max = prm.K if prm.K is not None else default_max_components(H, W, radius)
    if prm.init == "greedy":
        ini = greedy_init(Y, radius, K=k_max, nb=prm.nb, fps=prm.fps, tsub=prm.tsub, key=key)
    elif prm.init == "dendrite":
        from .dendrites import dendrite_init

        ini = dendrite_init(Y, radius, K=prm.K, nb=prm.nb)
    else:
        ini = sparse_nmf_init(Y, prm.K or _default_nmf_k(H, W, radius), nb=prm.nb, key=key)
    Yr = _pixels_by_frames(Y)
    del Y
    A, C = jnp.asarray(ini.A, jnp.float32), jnp.asarray(ini.C, jnp.float32)
    b, f = jnp.asarray(ini.b, jnp.float32), jnp.asarray(ini.f, jnp.float32)
    A, C, _ = _drop_degenerate(A, C)
    capped = prm.K is None and prm.init == "greedy" and A.shape[1] >= k_max
    _stage_done(prog, "initialise",
                f"{A.shape[1]} components" + (" (stopped at the safeguard bound; pass K)" if capped else ""),
                (Yr, A, C, b, f))

    tr = None
    for it in range(prm.n_iter):
        if A.shape[1] == 0:
            break
        A, b = update_spatial(Yr, A, C, b, f, sn_flat, radius=radius, shape=(H, W), method=prm.spatial_method,
                              compact=compact)
        A, norms = cleanup_footprints(A, (H, W), connected=compact, median=footprint_median(prm))
        C = _scale_rows(C, norms)
        A, C, _ = _drop_degenerate(A, C)
        _stage_done(prog, f"spatial {it + 1}/{prm.n_iter}", f"{A.shape[1]} components", (A, C, b))
        if A.shape[1] == 0:
            break
        b, f = update_background(Yr, A, C, b, f, n_iter=prm.background_iter)
        _stage_done(prog, f"background {it + 1}/{prm.n_iter}", outputs=(b, f))
        tr = update_temporal(Yr, A, C, b, f, p=prm.p, groups=temporal_groups(A, prm), n_sweeps=prm.temporal_sweeps,
                             lam=prm.lam, s_min=prm.s_min)
        C, f = tr.C, tr.f
        A, C, tr = _drop_degenerate(A, C, tr)
        _stage_done(prog, f"temporal {it + 1}/{prm.n_iter}", f"{A.shape[1]} components", (A, C, tr))
        if it < prm.n_iter - 1 and A.shape[1] > 1:
            keep = np.flatnonzero(~redundant_components(A, C, prm))
            n_mix = A.shape[1] - keep.size
            A, C, _ = _keep(keep, A, C)
            mr = merge_components(A, C, thr=prm.merge_thr) if prm.merge_thr < 1 else None
            if mr is not None:
                A, C = mr.A, mr.C
            _stage_done(prog, f"merge {it + 1}/{prm.n_iter}", f"{0 if mr is None else len(mr.groups)} merges, {n_mix} "
                        f"mixtures or duplicates dropped, {A.shape[1]} components", (A, C))
        else:
            _stage_done(prog, f"merge {it + 1}/{prm.n_iter}", "skipped")

    if A.shape[1] == 0 or tr is None:
        return empty_result((T, H, W), prm, sn=sn, b=b, f=f)
    mixed = redundant_components(A, C, prm)
    if mixed.any():  # the last iteration can leave mixtures or duplicates: drop them, refit the neighbours' traces
        A, C, tr = _drop_and_refit_neighbours(Yr, A, C, b, f, tr, mixed, prm)
    _stage_done(prog, "final check", f"{int(mixed.sum())} mixtures or duplicates dropped", (A, C, tr))

    q = evaluate_components(Yr, A, C, b, f, sn_flat, tr.YrA, fps=prm.fps, min_snr=prm.min_snr,
                            rval_thr=prm.rval_thr, shape=(H, W), radius=radius)
    snr, r_value, accepted = (np.asarray(x) for x in (q.snr, q.r_value, q.accepted))
    order = np.lexsort((-np.nan_to_num(snr, nan=-np.inf), ~accepted.astype(bool)))
    _stage_done(prog, "quality", f"{int(accepted.sum())} of {len(accepted)} accepted")

    A_np = np.asarray(A)[:, order]
    per = lambda x: np.asarray(x)[order]  # noqa: E731
    return Result(
        A=A_np.T.reshape(-1, H, W), C=per(tr.C), S=per(tr.S), b=np.asarray(b).T.reshape(-1, H, W),
        f=np.asarray(f), sn=sn, g=per(tr.g), YrA=per(tr.YrA), baseline=per(tr.baseline), c1=per(tr.c1),
        lam=per(tr.lam), snr=snr[order], r_value=r_value[order], accepted=accepted[order].astype(bool),
        centers=center_of_mass(A_np, (H, W)).astype(np.float32), params=prm.to_dict(), version=__version__,
    )


def default_max_components(H: int, W: int, radius: float) -> int:
    """Upper bound on K when none is given: half the field of view tiled by discs of the neuron radius.

    **Arguments:**

    - `H`, `W`: field of view in pixels; `radius`: neuron radius in pixels.

    **Returns:** `max(1, floor(H W / (2 pi radius^2)))`.
    """
    return max(1, int(H * W / (2 * math.pi * radius**2)))


def _default_nmf_k(H: int, W: int, radius: float) -> int:
    """Components for the sparse-NMF start when K is not given: about one per 4 neuron areas of the field."""
    return max(1, int(H * W / (4 * math.pi * radius**2)))


def redundant_components(A, C, prm: Params) -> np.ndarray:
    """Components the fit drops between iterations and in its final check, `(K,)` bool: mixtures of their neighbours
    (`merge.mixture_components` with `prm.mixture_thr`), then, among the rest, the weaker of two components with one
    footprint (`merge.duplicate_components`: a cell fitted twice, whose traces split its activity arbitrarily, so
    their correlation can stay below `merge_thr`; seen on a 32x32 patch fitted on binned frames, cosine 0.99,
    correlation 0.75). The other twin is kept, so a cell is never dropped whole."""
    from .merge import duplicate_components, mixture_components
    from .temporal import to_csc

    drop = mixture_components(A, C, thr=prm.mixture_thr)
    rest = np.flatnonzero(~drop)
    if rest.size > 1:  # the footprints as a sparse matrix: no dense (d, K) copy of the kept columns
        S = to_csc(A)[:, rest]
        drop[rest[duplicate_components(S, np.asarray(C)[rest])]] = True
    return drop


def temporal_groups(A, prm: Params) -> np.ndarray | None:
    """The groups the temporal update visits (`Params.temporal_groups`): None for "disjoint" (`update_temporal`
    colours the components itself), one row of all K components for "all"."""
    if prm.temporal_groups == "disjoint":
        return None
    return np.arange(A.shape[1], dtype=np.int32)[None]


def _drop_degenerate(A, C, tr=None):
    """`_keep` of the components that are not degenerate (`merge.degenerate_components`)."""
    from .merge import degenerate_components

    return _keep(np.flatnonzero(~degenerate_components(A, C)), A, C, tr)


def _keep(keep: np.ndarray, A, C, tr=None):
    """The components `keep` (increasing host indices) of `A` (d, K), `C` (K, T) and optionally a `TemporalResult`:
    the inputs themselves when all are kept (the common case), else one compiled selection (eager indexing of each
    array would be a program of its own to compile, or load from the cache, at a fit's first call)."""
    if keep.size == A.shape[1]:
        return A, C, tr
    return _select_components(jax.device_put(np.asarray(keep, np.int32)), A, C, tr)


@jax.jit
def _scale_rows(C, norms):
    """C with row k multiplied by norms[k] (the model A C unchanged after `cleanup_footprints` normalised A)."""
    return C * norms.astype(C.dtype)[:, None]


@jax.jit
def _select_components(keep, A, C, tr):
    return A[:, keep], C[keep], None if tr is None else tr.select(keep)


def _drop_and_refit_neighbours(Yr, A, C, b, f, tr, drop, prm):
    """Drop the components `drop` ((K,) bool) and refit the traces of the kept components whose footprints overlap a
    dropped one (one `update_temporal` on those groups only, kinetics `g` kept, background `f` fixed).

    Only those traces change: a component's raw trace depends on the others through overlapping footprints alone,
    so refitting all of them (what the final check did before) re-deconvolved every neuron for the one or two a
    dropped mixture touches (1.6 s of a 17 s warm fit of 256x256x3000). The other fields of the kept components are
    carried over; `YrA` is recomputed for all of them from the final traces.

    **Returns:** `(A, C, tr)` of the kept components.
    """
    from .temporal import color_components, overlap_graph, update_temporal

    drop = np.asarray(drop, bool)
    keep = np.flatnonzero(~drop)
    adj = overlap_graph(A)
    touched = np.flatnonzero((adj[drop].any(axis=0) & ~drop)[keep])  # positions among the kept
    A, C, tr = _keep(keep, A, C, tr)
    if touched.size == 0:
        return A, C, tr
    K = A.shape[1]
    adj = adj[np.ix_(keep, keep)]
    sub = color_components(None, adjacency=adj[np.ix_(touched, touched)])  # indices into `touched`, padded
    # The groups are as wide as a colouring of all the kept components (the fit's own groups): the refit then runs
    # the deconvolution compiled for the fit's iterations instead of tracing and compiling it for a few lanes
    # (0.8 s of a cold 256x256x3000 fit, for ~0.1 s more work on the padding lanes).
    width = max(sub.shape[1], color_components(None, adjacency=adj).shape[1])
    groups = np.full((sub.shape[0], width), K, np.int32)
    groups[:, : sub.shape[1]] = np.where(sub < touched.size, touched[np.minimum(sub, touched.size - 1)], K)
    new = update_temporal(Yr, A, C, b, f, g=tr.g, p=prm.p, groups=groups, n_sweeps=prm.temporal_sweeps,
                          update_f=False, lam=prm.lam, s_min=prm.s_min)
    return A, new.C, _refitted(tr, new, jax.device_put(touched.astype(np.int32)))


@jax.jit
def _refitted(tr, new, idx):
    """`tr` with the refitted components `idx` taken from `new` (C and YrA from `new` for all), in one program."""
    pick = lambda old, upd: old.at[idx].set(upd[idx])  # noqa: E731
    return type(tr)(C=new.C, S=pick(tr.S, new.S), YrA=new.YrA, g=tr.g, baseline=pick(tr.baseline, new.baseline),
                    c1=pick(tr.c1, new.c1), lam=pick(tr.lam, new.lam), f=tr.f, sn=pick(tr.sn, new.sn))
