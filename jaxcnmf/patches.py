"""Patch mode for large fields of view: equal-size overlapping patches fitted independently, stitched, then refined on
the whole field by streaming the movie from disk. It sits on top of `fit` (each patch is an ordinary fit).

Pipeline of `fit_patches`: tile the field (`patch_grid`) -> fit every patch (`fit.fit`, one compiled shape serves all
patches; jobs run in a loop, on all local devices, or on a Dask cluster, each checkpointed) -> `stitch_patches` (each
component kept by the patch that owns its centre, duplicates across borders merged) -> `refine` (whole-field spatial
and temporal updates from statistics streamed in chunks of frames, so footprints cut at borders grow back whole) ->
quality per component -> `Result`.

Out of core: the refinement never holds the movie. Every pass reads chunks of frames from the `MovieSource` and keeps
only per-pixel statistics of size `(pixels, components)`; the spatial and temporal stages of `fit` then run on an
exactly compressed problem (see `compress_time` and `compress_pixels`). `memory_budget` sets the chunk length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ParameterError, ResultFileError
from .result import Result

__all__ = [
    "fit_patches",
    "patch_grid",
    "owner_map",
    "stitch_patches",
    "refine",
    "parse_memory_budget",
    "chunk_frames_for_budget",
    "compress_time",
    "compress_pixels",
    "ProgressBar",
    "PatchJob",
    "run_patch_job",
]

DEFAULT_MEMORY_BUDGET = 2 * 2**30
# arrays of one chunk's size alive at once in a streamed pass (the float32 chunk, its residual, device copies)
_CHUNK_COPIES = 4
# copies of one patch's movie alive at once inside a patch fit (movie, pixels x frames copy, init's padded copies)
_PATCH_COPIES = 8
_MANIFEST = "manifest.json"
# pixels per block when a whole-field step works block by block (bounds its temporaries)
_PIXEL_BLOCK = 16384


# ------------------------------------------------------------------------------------------------------------ memory


def parse_memory_budget(budget: int | float | str | None) -> int:
    """Bytes from a memory budget given as a number of bytes or a string such as "2GB", "512 MiB", "1.5g".

    **Arguments:**

    - `budget`: bytes (int/float), a string with a unit (B, KB, MB, GB, TB; binary units KiB... and single letters
      k, m, g, t are read as powers of 1024, decimal KB, MB... as powers of 1000), or `None` (the default, 2 GiB).

    **Returns:** the budget in bytes (int).
    """
    if budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(budget, (int, float, np.integer, np.floating)) and not isinstance(budget, bool):
        value = float(budget)
    elif isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", budget.lower())
        if m is None:
            raise ParameterError(f"memory_budget={budget!r}: expected bytes or a size such as '2GB' or '512MiB'")
        power = " kmgt".index(m[2] or " ")
        base = 1000 if (m[4] and not m[3] and m[2]) else 1024
        value = float(m[1]) * base**power
    else:
        raise ParameterError(f"memory_budget={budget!r}: expected bytes or a size such as '2GB' or '512MiB'")
    if not math.isfinite(value) or value < 2**20:
        raise ParameterError(f"memory_budget={budget!r}: expected at least 1 MiB")
    return int(value)


def chunk_frames_for_budget(budget_bytes: int, frame_pixels: int, reserved_bytes: int = 0, n_frames: int | None = None,
                            min_frames: int = 8) -> int:
    """Frames per chunk of a streamed pass so that the chunk's working copies fit in what the budget leaves.

    **Arguments:**

    - `budget_bytes`: the memory budget; `frame_pixels`: pixels per frame (or per frame of a patch).
    - `reserved_bytes`: memory already spoken for (the result, per-pixel statistics).
    - `n_frames`: the movie length (the chunk is never longer); `min_frames`: the shortest chunk used.

    **Returns:** frames per chunk (int, at least `min_frames`, at most `n_frames`).
    """
    free = max(budget_bytes - reserved_bytes, 0) // 2  # half of what is left: room for the library and JAX itself
    frames = free // (_CHUNK_COPIES * 4 * max(frame_pixels, 1))
    frames = max(int(frames), min_frames)
    return frames if n_frames is None else max(1, min(frames, int(n_frames)))


# ------------------------------------------------------------------------------------------------------------ tiling


def patch_grid(shape: tuple[int, int], patch_size: int | tuple[int, int], overlap: int | tuple[int, int]) -> np.ndarray:
    """Equal-size overlapping patches covering an `H x W` field (CaImAn's `rf = patch_size / 2`, `stride`).

    Patches start every `patch_size - overlap` pixels; the last row/column of patches is shifted back so that it ends
    at the field's edge (it then overlaps its neighbour by more than `overlap`). Every patch has the same size, so one
    compiled fit serves all of them, and no patch holds padding (made-up pixels would distort noise estimates).
    A side shorter than `patch_size` gets one patch of the full side.

    **Arguments:**

    - `shape`: `(H, W)`; `patch_size`: side of a patch in pixels (int or `(rows, cols)`); `overlap`: pixels shared by
      neighbouring patches (int or pair), smaller than `patch_size`.

    **Returns:** `(n, 4)` int array of `(r0, r1, c0, c1)` (row-major order of patches).
    """
    H, W = int(shape[0]), int(shape[1])
    ps = np.broadcast_to(np.asarray(patch_size), (2,))
    ov = np.broadcast_to(np.asarray(overlap), (2,))
    starts = []
    for n, p, o in ((H, int(ps[0]), int(ov[0])), (W, int(ps[1]), int(ov[1]))):
        p = min(p, n)
        step = max(p - o, 1)
        s = list(range(0, max(n - p, 0) + 1, step))
        if s[-1] + p < n:
            s.append(n - p)
        starts.append((s, p))
    (rs, ph), (cs, pw) = starts
    return np.array([(r, r + ph, c, c + pw) for r in rs for c in cs], np.int64)


def owner_map(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Which patch owns each pixel: along rows and along columns separately, the patch whose centre is nearest (ties
    go to the first), i.e. every overlap is split down its middle into rectangles. A component is kept from the patch
    that owns its centre, so each neuron is kept once.

    **Arguments:**

    - `boxes`: `(n, 4)` patches from `patch_grid` (a grid: every row start combined with every column start);
      `shape`: `(H, W)`.

    **Returns:** `(H, W)` int array of patch indices.
    """
    H, W = shape
    boxes = np.asarray(boxes)
    index = {(int(b[0]), int(b[2])): i for i, b in enumerate(boxes)}
    r_starts = np.unique(boxes[:, 0])
    c_starts = np.unique(boxes[:, 2])
    ph, pw = int(boxes[0, 1] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 2])
    ri = np.argmin(np.abs(np.arange(H)[:, None] - (r_starts[None, :] + (ph - 1) / 2)), axis=1)
    ci = np.argmin(np.abs(np.arange(W)[:, None] - (c_starts[None, :] + (pw - 1) / 2)), axis=1)
    table = np.array([[index[(int(r), int(c))] for c in c_starts] for r in r_starts])
    return table[ri[:, None], ci[None, :]]


def check_patch_geometry(shape, patch_size, overlap, neuron_radius) -> None:
    """Raise `ParameterError` when patches cannot work: too small for a neuron, or overlap below one neuron diameter."""
    for name, v in (("patch_size", patch_size), ("overlap", overlap)):
        for x in np.atleast_1d(v):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0:
                raise ParameterError(f"{name}={v!r}: expected a non-negative integer number of pixels (or a pair)")
    ps = np.broadcast_to(np.asarray(patch_size), (2,))
    ov = np.broadcast_to(np.asarray(overlap), (2,))
    diameter = 2 * float(neuron_radius)
    if np.any(ov >= ps):
        raise ParameterError(f"overlap={overlap!r} must be smaller than patch_size={patch_size!r}")
    if np.any(np.minimum(ps, shape) < 4 * diameter):
        raise ParameterError(f"patch_size={patch_size!r}: a patch must be at least 4 neuron diameters wide "
                             f"({int(math.ceil(4 * diameter))} px for neuron_radius={neuron_radius}); "
                             f"use larger patches")
    if np.any((ov < diameter) & (np.asarray(ps) < np.asarray(shape))):
        raise ParameterError(f"overlap={overlap!r}: neighbouring patches must share at least one neuron diameter "
                             f"({int(math.ceil(diameter))} px) so that every neuron lies whole in some patch")


# ---------------------------------------------------------------------------------------------------------- progress


class ProgressBar:
    """A one-line progress bar on stderr: done/total, elapsed time and the estimated time remaining (or silent)."""

    def __init__(self, total: int, what: str = "patches", enabled: bool = True, stream=None):
        self.total = max(int(total), 0)
        self.what = what
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.skipped = 0
        self.t0 = time.perf_counter()

    def update(self, n: int = 1, *, skipped: bool = False) -> None:
        """Count `n` finished items (`skipped`: they came from checkpoints and do not enter the rate)."""
        self.done += n
        self.skipped += n if skipped else 0
        if self.enabled:
            self.stream.write("\r" + self.line())
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        """The current text of the bar."""
        elapsed = time.perf_counter() - self.t0
        worked = self.done - self.skipped
        left = self.total - self.done
        eta = "?" if worked == 0 and left else f"{elapsed / max(worked, 1) * left:.0f} s"
        width = 24
        fill = round(width * self.done / max(self.total, 1))
        return (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {self.what}  "
                f"elapsed {elapsed:.0f} s  ETA {eta}   ")

    def note(self, text: str) -> None:
        """Print a line (a stage of the run) with the elapsed time."""
        if self.enabled:
            self.stream.write(f"{text}  ({time.perf_counter() - self.t0:.1f} s)\n")
            self.stream.flush()


# -------------------------------------------------------------------------------------------------- reading windows


def read_window(source, box, chunk_frames: int) -> np.ndarray:
    """Frames of one patch `(T, r1 - r0, c1 - c0)` float32, read chunk by chunk (peak memory: one chunk + the patch).

    A memory-mapped movie (`.npy`, uncompressed TIFF) without non-finite values is sliced directly, so only the
    patch's rows are read from disk; other sources are read a chunk of whole frames at a time.

    **Arguments:**

    - `source`: a `MovieSource`; `box`: `(r0, r1, c0, c1)`; `chunk_frames`: frames per read.

    **Returns:** float32 array.
    """
    r0, r1, c0, c1 = (int(x) for x in box)
    T = len(source)
    out = np.empty((T, r1 - r0, c1 - c0), np.float32)
    mapped = _mapped_array(source)
    step = max(1, int(chunk_frames))
    if mapped is not None:
        for start in range(0, T, step):
            out[start:start + step] = mapped[start:start + step, r0:r1, c0:c1]
            release_pages(source)
        return out
    for start, chunk in source.iter_chunks(step):
        out[start:start + len(chunk)] = chunk[:, r0:r1, c0:c1]
        release_pages(source)
    return out


def _mapped_array(source):
    """The memory map behind a `MovieSource` when slicing it raw is safe (integers, or floats checked finite)."""
    reader = getattr(source, "_reader", None)
    array = getattr(reader, "array", None)
    if not isinstance(array, np.memmap):
        return None
    clean = source.dtype.kind in "ui" or (source.nonfinite_frames is not None and len(source.nonfinite_frames) == 0)
    return array if clean else None


def release_pages(source) -> None:
    """Unmap the pages of a memory-mapped movie that reads have touched (they stay in the OS file cache).

    Pages of a file mapping count in a process's resident memory until the kernel needs them back; dropping them
    after each chunk keeps the resident memory of a streamed pass at one chunk, as it would be with plain reads.
    """
    import mmap

    array = getattr(getattr(source, "_reader", None), "array", None)
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------------------------------------- patch jobs


@dataclasses.dataclass(frozen=True)
class PatchJob:
    """One patch fit, everything a worker needs: the movie (a path, an array or a `MovieSource`), the window, the
    parameters (a dict of `fit.Params` fields), a checkpoint file (or `None`) and the chunk length for reading."""

    movie: Any
    box: tuple[int, int, int, int]
    params: dict
    checkpoint: str | None = None
    chunk_frames: int = 1000


def _fit_window(window: np.ndarray, params: dict) -> Result:
    """`fit.fit` on one patch (a seam for tests that interrupt a run)."""
    from .fit import Params, fit

    return fit(window, params=Params(**params))


def run_patch_job(job: PatchJob) -> Result:
    """Fit one patch, or load it from its checkpoint when a previous run finished it; write the checkpoint atomically.

    **Arguments:**

    - `job`: the `PatchJob`.

    **Returns:** the patch's `Result` (in patch coordinates).
    """
    from .io import load_result, open_movie, save_result

    if job.checkpoint is not None and os.path.exists(job.checkpoint):
        return load_result(job.checkpoint)
    source = open_movie(job.movie, nonfinite=job.params.get("nonfinite", "raise"), check=False)
    window = read_window(source, job.box, job.chunk_frames)
    result = _fit_window(window, job.params)
    if job.checkpoint is not None:
        save_result(job.checkpoint, result)
        result = load_result(job.checkpoint)  # the run that resumes reads the same float32 values back
    return result


def run_jobs_local(jobs: Sequence[PatchJob], *, devices=None, progress: ProgressBar | None = None,
                   runner: Callable[[PatchJob], Result] = run_patch_job) -> list[Result]:
    """Run patch jobs in this process: in order on one device, or spread over several JAX devices (one thread each,
    computation pinned with `jax.default_device`). The results do not depend on the number of devices.

    **Arguments:**

    - `jobs`: the jobs; `devices`: `None` (all local devices), an int (the first n), or a list of `jax.Device`.
    - `progress`: a `ProgressBar` to advance; `runner`: what runs one job.

    **Returns:** the results, in the order of `jobs`.
    """
    import jax

    devs = resolve_devices(devices)
    results: list[Result | None] = [None] * len(jobs)

    def one(i, dev):
        resumed = jobs[i].checkpoint is not None and os.path.exists(jobs[i].checkpoint)
        with jax.default_device(dev):
            results[i] = runner(jobs[i])
        if progress is not None:
            progress.update(skipped=resumed)

    if len(devs) == 1 or len(jobs) <= 1:
        for i in range(len(jobs)):
            one(i, devs[0])
        return results
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(devs)) as pool:
        futures = [pool.submit(_device_worker, one, range(w, len(jobs), len(devs)), devs[w]) for w in range(len(devs))]
        for fut in futures:
            fut.result()
    return results


def _device_worker(one, indices, dev) -> None:
    for i in indices:
        one(i, dev)


def resolve_devices(devices=None) -> list:
    """The JAX devices to use: `None` -> all local devices, an int n -> the first n, or the given list."""
    import jax

    local = jax.local_devices()
    if devices is None:
        return list(local)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ParameterError(f"devices={devices!r}: this process has {len(local)} JAX device(s); pick 1.."
                                 f"{len(local)} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                                 f"importing jax makes N)")
        return list(local[:devices])
    devs = list(devices)
    if not devs:
        raise ParameterError("devices=[]: give at least one JAX device (or None for all of them)")
    return devs


# ------------------------------------------------------------------------------------------------------- checkpoints


def _movie_id(source) -> dict:
    return {"shape": [int(x) for x in source.shape]}


def prepare_checkpoints(checkpoint_dir: str | None, boxes: np.ndarray, source, params: dict,
                        tag: str = "") -> list[str | None]:
    """Create (or check) a checkpoint folder and name one file per patch.

    The folder holds `manifest.json` (movie shape, patches, parameters); a rerun with a different movie shape, tiling
    or parameters is refused (`ParameterError`) rather than silently mixing results.

    **Arguments:**

    - `checkpoint_dir`: the folder, or `None` for no checkpoints; `boxes`: the patches; `source`: the movie;
      `params`: the fit parameters; `tag`: a prefix for the files (the movie index of `fit_many`).

    **Returns:** one path per patch (or `None`s).
    """
    if checkpoint_dir is None:
        return [None] * len(boxes)
    from .io import atomic_output

    os.makedirs(checkpoint_dir, exist_ok=True)
    manifest = {"movie": _movie_id(source), "boxes": np.asarray(boxes).tolist(), "params": params}
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(checkpoint_dir, f"{tag}{_MANIFEST}")
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        if old.get("key") != key:
            raise ParameterError(
                f"checkpoint_dir={checkpoint_dir!r} holds patch results of another run (different movie shape, "
                f"patches or parameters); use an empty folder, or delete it to start over")
    else:
        with atomic_output(path) as tmp, open(tmp, "w") as fh:
            json.dump({**manifest, "key": key}, fh, default=str)
    return [os.path.join(checkpoint_dir, f"{tag}patch_{i:04d}_r{b[0]}_c{b[2]}.npz") for i, b in enumerate(boxes)]


# ---------------------------------------------------------------------------------------------------------- stitching


@dataclasses.dataclass(frozen=True)
class Stitched:
    """Whole-field start for the refinement: A `(d, K)` unit-norm, C `(K, T)`, b `(d, nb)`, f `(nb, T)`, sn `(H, W)`,
    `patch` `(K,)` the patch each component came from, `merges` the number of cross-border merges."""

    A: np.ndarray
    C: np.ndarray
    b: np.ndarray
    f: np.ndarray
    sn: np.ndarray
    patch: np.ndarray
    merges: int


def stitch_patches(results: Sequence[Result], boxes: np.ndarray, shape: tuple[int, int], *, merge_thr: float = 0.85
                   ) -> Stitched:
    """Put the patch fits together on the whole field.

    1. Each component is kept only by the patch that owns its centre of mass (`owner_map`), so a neuron seen by two
       overlapping patches is kept once.
    2. Components from different patches whose footprints overlap and whose traces correlate above `merge_thr` (the
       same neuron, its centre estimated on either side of the split line) are merged (`merge.merge_components`).
    3. Noise: each pixel's `sn` from the patch that owns it (per-pixel estimates do not depend on the patch).
       Background: traces `f` = the leading `nb` right singular vectors of all patches' background contributions,
       footprints `b` = each owned pixel's least-squares fit of its patch's `b f` on them (the refinement refits both).

    **Arguments:**

    - `results`: the patch `Result`s; `boxes`: `(n, 4)` patches; `shape`: `(H, W)`; `merge_thr`: correlation threshold.

    **Returns:** a `Stitched`.
    """
    from .merge import merge_components, trace_correlation

    H, W = shape
    d = H * W
    owner = owner_map(boxes, shape)
    T = int(results[0].f.shape[1])
    nb = int(results[0].b.shape[0])
    cols, traces, patch = [], [], []
    sn = np.zeros((H, W), np.float32)
    for p, (res, box) in enumerate(zip(results, boxes)):
        r0, r1, c0, c1 = (int(x) for x in box)
        own = owner[r0:r1, c0:c1] == p
        sn[r0:r1, c0:c1][own] = np.asarray(res.sn)[own]
        A_p = np.asarray(res.A)
        if A_p.shape[0] == 0:
            continue
        cen = np.asarray(res.centers, np.float64)
        rr = np.clip(np.round(cen[:, 0]), 0, r1 - r0 - 1).astype(int)
        cc = np.clip(np.round(cen[:, 1]), 0, c1 - c0 - 1).astype(int)
        keep = np.flatnonzero(np.isfinite(cen).all(axis=1) & own[rr, cc])
        for k in keep:
            full = np.zeros((H, W), np.float32)
            full[r0:r1, c0:c1] = A_p[k]
            cols.append(full.reshape(d))
            traces.append(np.asarray(res.C[k], np.float32))
            patch.append(p)
    b, f = _stitch_background(results, boxes, owner, (H, W), nb, T)
    if not cols:
        return Stitched(np.zeros((d, 0), np.float32), np.zeros((0, T), np.float32), b, f, sn, np.zeros(0, int), 0)
    A = np.stack(cols, axis=1)
    C = np.stack(traces)
    patch = np.asarray(patch)
    groups = _cross_patch_groups(A, C, patch, merge_thr, trace_correlation)
    if groups:
        mr = merge_components(A, C, groups=groups)
        A, C, patch = np.asarray(mr.A), np.asarray(mr.C), patch[np.asarray(mr.source)]
    return Stitched(A.astype(np.float32), C.astype(np.float32), b, f, sn, patch, len(groups))


def _cross_patch_groups(A, C, patch, thr, trace_correlation) -> list[list[int]]:
    """Connected sets of components from different patches with overlapping footprints and traces correlated > thr."""
    import scipy.sparse
    import scipy.sparse.csgraph

    support = scipy.sparse.csc_matrix((A > 0).astype(np.float32))
    overlap = (support.T @ support).toarray() > 0
    linked = overlap & (trace_correlation(C) > thr) & (patch[:, None] != patch[None, :])
    np.fill_diagonal(linked, False)
    if not linked.any():
        return []
    n, labels = scipy.sparse.csgraph.connected_components(scipy.sparse.csr_matrix(linked), directed=False)
    sets = [sorted(np.flatnonzero(labels == i).tolist()) for i in range(n)]
    return sorted(s for s in sets if len(s) > 1)


def _stitch_background(results, boxes, owner, shape, nb, T):
    """Whole-field background start (see `stitch_patches`, step 3): `b` `(d, nb)` >= 0, `f` `(nb, T)` >= 0."""
    H, W = shape
    rows = []
    for res in results:
        bn = np.linalg.norm(np.asarray(res.b, np.float64).reshape(nb, -1), axis=1)
        rows.append(bn[:, None] * np.asarray(res.f, np.float64))
    Fstack = np.concatenate(rows)
    _, _, Vt = np.linalg.svd(Fstack, full_matrices=False)
    f = Vt[:nb]
    f = f * np.sign(f.sum(axis=1, keepdims=True) + 1e-300)
    f = np.maximum(f, 0.0)
    f *= math.sqrt(T) / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-30)  # rms 1, like a flat trace
    ff_inv = np.linalg.pinv(f @ f.T)
    b = np.zeros((H, W, nb), np.float64)
    for p, (res, box) in enumerate(zip(results, boxes)):
        r0, r1, c0, c1 = (int(x) for x in box)
        own = owner[r0:r1, c0:c1] == p
        b_p = np.moveaxis(np.asarray(res.b, np.float64), 0, -1)  # (h, w, nb)
        proj = b_p @ (np.asarray(res.f, np.float64) @ f.T) @ ff_inv  # (h, w, nb)
        b[r0:r1, c0:c1][own] = proj[own]
    return np.maximum(b.reshape(H * W, nb), 0.0).astype(np.float32), f.astype(np.float32)


# ------------------------------------------------------------------------------------------- exact compressions


def compress_time(Zq: np.ndarray, zz: np.ndarray, A: np.ndarray, C: np.ndarray, b: np.ndarray, f: np.ndarray,
                  sn: np.ndarray, T: int, rtol: float = 1e-9):
    """An `(d, r + 1)` movie on which the spatial update gives exactly what it gives on the `(d, T)` movie.

    The spatial update sees the movie only through, for each pixel i with r_i = y_i - b_i f and F = [C; f],
    q_i = r_i F', G = F F' and ||r_i||^2. With F F' = V E V' (rank r), the rows of Q = E^{-1/2} V' F are an orthonormal
    basis of the traces' span and F = M Q with M = V E^{1/2}. Pixel i is replaced by its coordinates
    u_i = r_i Q' = q_i V E^{-1/2} plus one extra coordinate e_i = ||r_i - u_i Q|| (what lies outside the span), and the
    traces by M (plus a zero column). Then q, G and ||r_i||^2 are unchanged; the noise budget sn^2 T is kept by
    scaling sn by sqrt(T / (r + 1)). The statistics come from the residual z = y - A C - b f (noise-sized, so float32
    sums stay accurate): q_i = z_i F' + a_i C F', and e_i^2 = ||z_i||^2 - ||z_i F' V E^{-1/2}||^2.

    **Arguments:**

    - `Zq`: `(d, K + nb)` = z F' summed over the movie; `zz`: `(d,)` = ||z_i||^2.
    - `A` `(d, K)`, `C` `(K, T)`, `b` `(d, nb)`, `f` `(nb, T)`: the model the residual was taken against.
    - `sn`: `(d,)` noise per pixel; `T`: frames; `rtol`: eigenvalues below `rtol * max` are dropped.

    **Returns:** `(Yc (d, r+1), Cc (K, r+1), fc (nb, r+1), snc (d,))`, float64 if `Zq` is float64, else float32.
    """
    out = np.float64 if np.asarray(Zq).dtype == np.float64 else np.float32
    K = A.shape[1]
    F = np.concatenate([C, f]).astype(np.float64)
    e, V = np.linalg.eigh(F @ F.T)
    keep = e > rtol * max(e.max(initial=0.0), 1e-300)
    e, V = e[keep], V[:, keep]
    Vs = V / np.sqrt(e)  # V E^{-1/2}
    M = V * np.sqrt(e)  # V E^{1/2}
    r = M.shape[1]
    CF = C.astype(np.float64) @ F.T
    fc = M[K:]
    d = A.shape[0]
    Yc = np.empty((d, r + 1), out)
    for i in range(0, d, _PIXEL_BLOCK):  # pixel blocks: float64 temporaries stay small on a large field
        blk = slice(i, min(i + _PIXEL_BLOCK, d))
        zq = np.asarray(Zq[blk], np.float64)
        zs = zq @ Vs
        Yc[blk, :r] = zs + (np.asarray(A[blk], np.float64) @ CF) @ Vs + np.asarray(b[blk], np.float64) @ fc
        e2 = np.asarray(zz[blk], np.float64) - np.sum(zs**2, axis=1)
        Yc[blk, r] = np.sqrt(np.maximum(e2, 0.0))
    zero = lambda n: np.zeros((n, 1))  # noqa: E731
    Cc = np.concatenate([M[:K], zero(K)], axis=1)
    fc = np.concatenate([fc, zero(f.shape[0])], axis=1)
    snc = np.asarray(sn, np.float64) * math.sqrt(T / (r + 1))
    return Yc, Cc.astype(out), fc.astype(out), snc.astype(out)


def compress_pixels(MY: np.ndarray, A: np.ndarray, b: np.ndarray, rtol: float = 1e-9):
    """A `(r, T)` movie on which the temporal update gives exactly what it gives on the `(d, T)` movie.

    The temporal update sees the movie only through M'Y with M = [A b] (and M'M). With M'M = U D U' (rank r), the
    movie P Y (r, T) with P = D^{-1/2} U' M' and footprints D^{1/2} U' (split into the A and b parts) reproduce M'Y
    and M'M exactly (M'Y lies in the row space of M').

    **Arguments:**

    - `MY`: `(K + nb, T)` = [A b]' Y, streamed; `A` `(d, K)`; `b` `(d, nb)`.
    - `rtol`: eigenvalues below `rtol * max` are dropped.

    **Returns:** `(Yp (r, T), Ap (r, K), bp (r, nb))`, float64 if `MY` is float64, else float32.
    """
    out = np.float64 if np.asarray(MY).dtype == np.float64 else np.float32
    K = A.shape[1]
    M = np.concatenate([A, b], axis=1)
    G = _gram(M)
    D, U = np.linalg.eigh(G)
    keep = D > rtol * max(D.max(initial=0.0), 1e-300)
    D, U = D[keep], U[:, keep]
    Yp = (U / np.sqrt(D)).T @ np.asarray(MY, np.float64)
    P = (U * np.sqrt(D)).T
    return Yp.astype(out), P[:, :K].astype(out), P[:, K:].astype(out)


def _gram(M: np.ndarray) -> np.ndarray:
    """M'M in float64 from a mostly-zero `(d, n)` matrix (sparse product)."""
    import scipy.sparse

    S = scipy.sparse.csc_matrix(M)  # no dense float64 copy of M
    return (S.T @ S).toarray().astype(np.float64)


# -------------------------------------------------------------------------------------------------- streamed passes


class Streamer:
    """Passes over a movie in chunks of frames, with the pixels of each chunk sharded over the JAX devices
    (`NamedSharding` on a 1-D mesh): the statistics of a pass are `(pixels, components)` arrays, never the movie.

    **Arguments:**

    - `source`: a `MovieSource`; `chunk_frames`: frames per chunk; `devices`: as in `resolve_devices`.
    """

    def __init__(self, source, chunk_frames: int, devices=None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.source = source
        self.T, self.H, self.W = source.shape
        self.d = self.H * self.W
        self.chunk = max(1, min(int(chunk_frames), self.T))
        devs = resolve_devices(devices)
        self.n_dev = len(devs)
        self.dp = -(-self.d // self.n_dev) * self.n_dev
        mesh = Mesh(np.asarray(devs), ("pix",))
        self.rows = NamedSharding(mesh, P("pix", None))  # (pixels, x) split by pixels
        self.cols = NamedSharding(mesh, P(None, "pix"))  # (frames, pixels) split by pixels
        self.vec = NamedSharding(mesh, P("pix"))
        self.rep = NamedSharding(mesh, P())
        self._jax = jax

    def _put(self, x, sharding, pad_axis=None):
        x = np.asarray(x, np.float32)
        if pad_axis is not None and x.shape[pad_axis] != self.dp:
            pad = [(0, 0)] * x.ndim
            pad[pad_axis] = (0, self.dp - x.shape[pad_axis])
            x = np.pad(x, pad)
        return self._jax.device_put(x, sharding)

    def _chunks(self):
        for start, chunk in self.source.iter_chunks(self.chunk):
            release_pages(self.source)
            n = len(chunk)
            Y = chunk.reshape(n, self.d)
            if n < self.chunk or self.dp != self.d:
                Y = np.pad(Y, ((0, self.chunk - n), (0, self.dp - self.d)))
            yield start, n, self._put(Y, self.cols)

    def _window(self, X, start, n):
        """Columns `start..start+n` of a `(r, T)` array, zero-padded to the chunk length."""
        out = np.zeros((X.shape[0], self.chunk), np.float32)
        out[:, :n] = X[:, start:start + n]
        return self._put(out, self.rep)

    def residual_statistics(self, A, C, b, f):
        """One pass: Zq = z F' `(d, K + nb)` and zz = ||z_i||^2 `(d,)`, z = y - A C - b f, F = [C; f]."""
        import jax.numpy as jnp

        Ad, bd = self._put(A, self.rows, 0), self._put(b, self.rows, 0)
        F = np.concatenate([C, f])
        Zq = self._jax.device_put(jnp.zeros((self.dp, F.shape[0]), jnp.float32), self.rows)
        zz = self._jax.device_put(jnp.zeros((self.dp,), jnp.float32), self.vec)
        for start, n, Y in self._chunks():
            Zq, zz = _residual_chunk(Zq, zz, Y, Ad, bd, self._window(C, start, n), self._window(f, start, n))
        return np.asarray(Zq)[: self.d], np.asarray(zz)[: self.d]

    def project(self, M):
        """One pass: M'Y `(n, T)` for `M` `(d, n)`."""
        Md = self._put(M, self.rows, 0)
        out = np.zeros((M.shape[1], self.T), np.float32)
        for start, n, Y in self._chunks():
            out[:, start:start + n] = np.asarray(_project_chunk(Y, Md))[:, :n]
        return out


def _jit(fn):
    import jax

    return jax.jit(fn)


@_jit
def _residual_chunk(Zq, zz, Y, A, b, C, f):
    Z = Y - C.T @ A.T - f.T @ b.T  # (t, d) residual of the chunk
    return Zq + Z.T @ _concat(C, f).T, zz + (Z * Z).sum(axis=0)


def _concat(C, f):
    import jax.numpy as jnp

    return jnp.concatenate([C, f])


@_jit
def _project_chunk(Y, M):
    return M.T @ Y.T


# --------------------------------------------------------------------------------------------------------- refinement


def refine(source, start: Stitched, prm, *, chunk_frames: int | None = None, memory_budget=None, devices=None,
           n_iter: int = 1,
           boxes: np.ndarray | None = None, progress: ProgressBar | None = None) -> Result:
    """Whole-field refinement of a stitched start, out of core: `n_iter` times [spatial update (one pass) ->
    clean-up -> temporal update (one pass)], with merging between iterations, then quality per component.

    Both updates are the public stages of `fit` (`spatial.update_spatial`, `temporal.update_temporal`) run on exactly
    compressed movies built from streamed statistics (`compress_time`, `compress_pixels`), so the movie is never in
    memory. Search areas grow from the stitched footprints, so a footprint cut at a patch border is completed here.
    Quality (`quality.evaluate_components`) needs frames of the movie itself: each component is evaluated on the
    window of the patch that owns its centre (one more pass, patch by patch).

    **Arguments:**

    - `source`: the `MovieSource`; `start`: from `stitch_patches`; `prm`: `fit.Params`.
    - `chunk_frames`: frames per chunk; `None` derives it from `memory_budget` (bytes or "2GB", default 2 GiB) after
      reserving the per-pixel statistics (about 6 arrays of `(pixels, K + nb + 1)` float32).
    - `devices`: devices for the sharded passes; `n_iter`: refinement iterations.
    - `boxes`: the patches (for the quality windows; `None`: one window, the whole field).
    - `progress`: a `ProgressBar` for stage notes.

    **Returns:** the whole-field `Result` (same layout and ordering as `fit`'s).
    """
    import jax.numpy as jnp

    from .fit import empty_result
    from .merge import degenerate_components, merge_components
    from .spatial import cleanup_footprints
    from .temporal import color_components, update_temporal

    T, H, W = source.shape
    d = H * W
    note = progress.note if progress is not None else (lambda s: None)
    if chunk_frames is None:
        reserved = 6 * 4 * d * (start.A.shape[1] + start.b.shape[1] + 1)
        chunk_frames = chunk_frames_for_budget(parse_memory_budget(memory_budget), d, reserved, n_frames=T)
    stream = Streamer(source, chunk_frames, devices)
    A, C, b, f = start.A, start.C, start.b, start.f
    sn = start.sn.reshape(d)
    compact = prm.init == "greedy"
    tr = None
    for it in range(n_iter):
        if A.shape[1] == 0:
            break
        Zq, zz = stream.residual_statistics(A, C, b, f)
        Yc, Cc, fc, snc = compress_time(Zq, zz, A, C, b, f, sn, T)
        A, b = spatial_by_blocks(Yc, A, Cc, b, fc, snc, radius=float(prm.neuron_radius), shape=(H, W),
                                 method=prm.spatial_method, compact=compact)
        del Yc, Zq
        A, norms = cleanup_footprints(A, (H, W), connected=compact)
        A, b = np.asarray(A), np.asarray(b)
        C = C * np.asarray(norms)[:, None]
        keep = np.flatnonzero(~degenerate_components(A, C))
        A, C = A[:, keep], C[keep]
        note(f"refine {it + 1}/{n_iter}: spatial update, {A.shape[1]} components")
        if A.shape[1] == 0:
            break
        MY = stream.project(np.concatenate([A, b], axis=1))
        Yp, Ap, bp = compress_pixels(MY, A, b)
        tr = update_temporal(Yp, Ap, C, bp, f, p=prm.p, groups=color_components(A), n_sweeps=prm.temporal_sweeps,
                             lam=prm.lam, s_min=prm.s_min)
        C, f = np.asarray(tr.C), np.asarray(tr.f)
        keep = np.flatnonzero(~degenerate_components(A, C))
        A, C = A[:, keep], C[keep]
        tr = _take(tr, keep)
        note(f"refine {it + 1}/{n_iter}: temporal update, {A.shape[1]} components")
        if it < n_iter - 1 and prm.merge_thr < 1 and A.shape[1] > 1:
            mr = merge_components(jnp.asarray(A), jnp.asarray(C), thr=prm.merge_thr)
            A, C = np.asarray(mr.A), np.asarray(mr.C)
    if A.shape[1] == 0 or tr is None:
        return empty_result((T, H, W), prm, sn=start.sn, b=b, f=f)
    q = _quality_by_window(source, A, tr, b, f, sn, prm, boxes, chunk_frames)
    note("refine: quality")
    return _assemble(A, tr, b, f, start.sn, q, prm, (H, W))


def spatial_by_blocks(Yc, A, Cc, b, fc, snc, *, radius, shape, method, compact, block: int | None = None):
    """`spatial.update_spatial` block by block of pixels (its problem is separable over pixels once the search areas
    are fixed), so its temporaries are those of one block; the result equals one call on the whole field.

    **Arguments:** as for `update_spatial` (`Yc` `(d, n)`, `A` `(d, K)`, `Cc` `(K, n)`, `b` `(d, nb)`, `fc`
    `(nb, n)`, `snc` `(d,)`), plus `block` pixels per call (default 4 x 16384).

    **Returns:** `(A (d, K), b (d, nb))` numpy, in `Yc`'s dtype.
    """
    from .spatial import search_areas, update_spatial

    d = A.shape[0]
    block = block or 4 * _PIXEL_BLOCK
    search = np.asarray(search_areas(A, shape, radius, compact=compact))
    A_new = np.empty(A.shape, Yc.dtype)
    b_new = np.empty(b.shape, Yc.dtype)
    for i in range(0, d, block):
        blk = slice(i, min(i + block, d))
        a_i, b_i = update_spatial(Yc[blk], A[blk], Cc, b[blk], fc, snc[blk], search=search[blk], method=method)
        A_new[blk], b_new[blk] = np.asarray(a_i), np.asarray(b_i)
    return A_new, b_new


def _take(tr, keep):
    return type(tr)(C=tr.C[keep], S=tr.S[keep], YrA=tr.YrA[keep], g=tr.g[keep], baseline=tr.baseline[keep],
                    c1=tr.c1[keep], lam=tr.lam[keep], f=tr.f, sn=tr.sn[keep])


def _quality_by_window(source, A, tr, b, f, sn, prm, boxes, chunk_frames):
    """`quality.evaluate_components` per patch window, each component scored in the window owning its centre."""
    from .fit import center_of_mass
    from .quality import evaluate_components
    from .temporal import bucket

    T, H, W = source.shape
    K = A.shape[1]
    boxes = np.array([[0, H, 0, W]]) if boxes is None else np.asarray(boxes)
    owner = owner_map(boxes, (H, W))
    cen = center_of_mass(A, (H, W))
    rr = np.clip(np.round(np.nan_to_num(cen[:, 0])), 0, H - 1).astype(int)
    cc = np.clip(np.round(np.nan_to_num(cen[:, 1])), 0, W - 1).astype(int)
    home = owner[rr, cc]
    snr, rval, acc = np.zeros(K, np.float32), np.zeros(K, np.float32), np.zeros(K, bool)
    A3 = A.T.reshape(K, H, W)
    b3 = b.T.reshape(-1, H, W)
    sn3 = sn.reshape(H, W)
    for p, box in enumerate(boxes):
        mine = np.flatnonzero(home == p)
        if mine.size == 0:
            continue
        r0, r1, c0, c1 = (int(x) for x in box)
        here = np.flatnonzero(A3[:, r0:r1, c0:c1].reshape(K, -1).any(axis=1))
        Y = read_window(source, box, chunk_frames)
        dp = (r1 - r0) * (c1 - c0)
        Yr = np.ascontiguousarray(Y.reshape(T, dp).T)
        del Y
        # pad the window's components to a bucket size with empty ones (no footprint, no trace: they change nothing
        # in the others' demixed r-values), so that windows share compiled shapes
        n, m = len(here), bucket(len(here))
        Ap = np.zeros((dp, m), np.float32)
        Ap[:, :n] = A3[here][:, r0:r1, c0:c1].reshape(n, dp).T
        Cp, YrAp = (np.zeros((m, T), np.float32) for _ in range(2))
        Cp[:n], YrAp[:n] = np.asarray(tr.C)[here], np.asarray(tr.YrA)[here]
        bp = b3[:, r0:r1, c0:c1].reshape(b3.shape[0], dp).T
        q = evaluate_components(Yr, Ap, Cp, bp, f, sn3[r0:r1, c0:c1].reshape(dp), YrAp, fps=prm.fps,
                                min_snr=prm.min_snr, rval_thr=prm.rval_thr, shape=(r1 - r0, c1 - c0),
                                radius=float(prm.neuron_radius))
        pos = np.searchsorted(here, mine)
        snr[mine] = np.asarray(q.snr)[pos]
        rval[mine] = np.asarray(q.r_value)[pos]
        acc[mine] = np.asarray(q.accepted)[pos]
    return snr, rval, acc


def _assemble(A, tr, b, f, sn, q, prm, shape) -> Result:
    """The `Result` in `fit`'s layout: accepted first, then by decreasing SNR."""
    from ._version import __version__
    from .fit import center_of_mass

    H, W = shape
    snr, r_value, accepted = q
    order = np.lexsort((-np.nan_to_num(snr, nan=-np.inf), ~accepted))
    per = lambda x: np.asarray(x)[order]  # noqa: E731
    A_o = np.asarray(A)[:, order]
    return Result(
        A=A_o.T.reshape(-1, H, W), C=per(tr.C), S=per(tr.S), b=np.asarray(b).T.reshape(-1, H, W),
        f=np.asarray(f), sn=np.asarray(sn, np.float32), g=per(tr.g), YrA=per(tr.YrA), baseline=per(tr.baseline),
        c1=per(tr.c1), lam=per(tr.lam), snr=snr[order], r_value=r_value[order], accepted=accepted[order],
        centers=center_of_mass(A_o, (H, W)).astype(np.float32), params=prm.to_dict(), version=__version__,
    )


# ---------------------------------------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class PatchPlan:
    """A checked patch run of one movie: source, parameters, patches, chunk length, jobs."""

    source: Any
    prm: Any
    boxes: np.ndarray
    chunk_frames: int
    jobs: list
    memory_budget: int = DEFAULT_MEMORY_BUDGET


def plan_patches(movie, neuron_radius=None, *, patch_size=64, overlap=None, params=None, checkpoint_dir=None,
                 memory_budget=None, tag: str = "", **overrides) -> PatchPlan:
    """Check everything and lay out the jobs of a patch run, before any heavy work (see `fit_patches`)."""
    from .fit import check_movie_shape, make_params
    from .io import open_movie

    prm = make_params(neuron_radius, params=params, **overrides)
    source = open_movie(movie, nonfinite=prm.nonfinite, min_frames=1)
    T, H, W = source.shape
    check_movie_shape((T, H, W), prm, source.path or "movie")
    if overlap is None:
        overlap = int(math.ceil(4 * prm.neuron_radius))
    check_patch_geometry((H, W), patch_size, overlap, prm.neuron_radius)
    budget = parse_memory_budget(memory_budget)
    boxes = patch_grid((H, W), patch_size, overlap)
    ph, pw = int(boxes[0, 1] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 2])
    need = _PATCH_COPIES * 4 * T * ph * pw
    if need > budget:
        side = int(math.sqrt(budget / (_PATCH_COPIES * 4 * T)))
        raise ParameterError(
            f"patch_size={patch_size!r}: fitting one {ph}x{pw} patch of {T} frames needs about {need / 2**30:.2f} GiB, "
            f"more than memory_budget={memory_budget!r} ({budget / 2**30:.2f} GiB); use patch_size <= {side} or a "
            f"larger budget")
    chunk = chunk_frames_for_budget(budget, H * W, reserved_bytes=need, n_frames=T)
    checkpoints = prepare_checkpoints(checkpoint_dir, boxes, source, prm.to_dict(), tag=tag)
    movie_ref = source.path if source.path is not None else source
    jobs = [PatchJob(movie_ref, tuple(int(x) for x in box), prm.to_dict(), ck, chunk)
            for box, ck in zip(boxes, checkpoints)]
    return PatchPlan(source, prm, boxes, chunk, jobs, budget)


def run_jobs(jobs: Sequence[PatchJob], engine="local", *, devices=None, progress: ProgressBar | None = None):
    """Run patch jobs on an engine: "local" (this process, all its devices), "dask" (the current Dask client, or a
    new local cluster) or a `distributed.Client`.

    **Returns:** the results in the order of `jobs`.
    """
    if isinstance(engine, str) and engine == "local":
        return run_jobs_local(jobs, devices=devices, progress=progress)
    if (isinstance(engine, str) and engine == "dask") or type(engine).__name__ == "Client":
        from .cluster import run_jobs_dask

        return run_jobs_dask(jobs, client=None if isinstance(engine, str) else engine, progress=progress)
    raise ParameterError(f"engine={engine!r}: expected 'local', 'dask' or a dask.distributed Client")


def finish_patches(plan: PatchPlan, results, *, devices=None, n_refine: int = 1, progress=None) -> Result:
    """Stitch the patch results of a plan and refine them on the whole field (see `fit_patches`)."""
    T, H, W = plan.source.shape
    start = stitch_patches(results, plan.boxes, (H, W), merge_thr=plan.prm.merge_thr)
    if progress is not None:
        progress.note(f"stitched: {start.A.shape[1]} components ({start.merges} merged across borders)")
    res = refine(plan.source, start, plan.prm, memory_budget=plan.memory_budget, devices=devices, n_iter=n_refine,
                 boxes=plan.boxes, progress=progress)
    ps = plan.boxes[0]
    params = {**res.params, "patch_size": [int(ps[1] - ps[0]), int(ps[3] - ps[2])], "n_patches": int(len(plan.boxes))}
    return Result.from_arrays(res.arrays(), params, res.version)


def fit_patches(movie, neuron_radius: float | None = None, *, patch_size: int | tuple[int, int] = 64,
                overlap: int | tuple[int, int] | None = None, params=None, checkpoint_dir: str | None = None,
                engine="local", devices=None, memory_budget: int | str | None = None, n_refine: int = 1,
                progress: bool = False, **overrides) -> Result:
    """Fit CNMF to a large field of view patch by patch, stitch, and refine on the whole field (`patch_size` replaces
    CaImAn's `rf`, about `patch_size / 2`; `overlap` its `stride`).

    1. Tile the field into equal overlapping patches (`patch_grid`); each is fitted by `fit.fit` with the same
       parameters (one compiled shape serves all). With `checkpoint_dir`, each patch result is written atomically as
       soon as it is done, and a rerun (e.g. after the process was killed) loads finished patches instead of fitting
       them again; the final result is the same as an uninterrupted run's.
    2. `stitch_patches`: each component is kept by the patch owning its centre; duplicates across borders merged.
    3. `refine`: `n_refine` whole-field spatial + temporal updates, streamed from the movie in chunks (out of core),
       seeded by the stitched footprints and traces, then quality per component.

    **Arguments:**

    - `movie`: a path (memory-mapped or chunk-read, never loaded whole), a `(T, H, W)` array or a `MovieSource`.
    - `neuron_radius`, `params`, `overrides`: as for `fit.fit` (`K`, if given, bounds the components of each patch).
    - `patch_size`: patch side in pixels (int or pair; default 64); `overlap`: pixels shared by neighbouring patches
      (default 4 neuron radii; at least one neuron diameter).
    - `checkpoint_dir`: folder for per-patch results (resume); `None`: no checkpoints.
    - `engine`: "local" (this process), "dask" (the current Dask client or a new local cluster) or a
      `distributed.Client` (see `cluster.py`); the result does not depend on the engine.
    - `devices`: JAX devices for the local engine and the streamed passes (`None`: all local devices).
    - `memory_budget`: bytes or a string like "2GB" (default 2 GiB): sets the chunk length of the streamed passes and
      refuses patches too large to fit in it.
    - `n_refine`: whole-field refinement iterations; `progress`: a progress bar with time remaining on stderr.

    **Returns:** a `Result` for the whole field, laid out and ordered like `fit`'s; its `params` also record
    `patch_size` and `n_patches`.
    """
    plan = plan_patches(movie, neuron_radius, patch_size=patch_size, overlap=overlap, params=params,
                        checkpoint_dir=checkpoint_dir, memory_budget=memory_budget, **overrides)
    bar = ProgressBar(len(plan.jobs), "patches", enabled=progress)
    results = run_jobs(plan.jobs, engine, devices=devices, progress=bar)
    return finish_patches(plan, results, devices=devices, n_refine=n_refine, progress=bar)


def load_checkpoints(checkpoint_dir: str) -> list[Result]:
    """The patch results saved in a checkpoint folder, in patch order (for inspection)."""
    from .io import load_result

    if not os.path.isdir(checkpoint_dir):
        raise ResultFileError(f"checkpoint_dir={checkpoint_dir!r} does not exist")
    names = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("patch_") and n.endswith(".npz"))
    return [load_result(os.path.join(checkpoint_dir, n)) for n in names]
