"""Patch mode for large fields of view: equal-size overlapping patches fitted independently, stitched, then refined on
the whole field by streaming the movie from disk. It sits on top of `fit` (each patch is an ordinary fit).

Pipeline of `fit_patches`: tile the field (`patch_grid`) -> fit every patch (`fit.fit`, one compiled shape serves all
patches; jobs run in a loop, on all local devices, or on a Dask cluster, each checkpointed) -> `stitch_patches` (each
component kept by the patch that owns its centre, duplicates across borders merged) -> `refine` (whole-field spatial
and temporal updates from statistics streamed in chunks of frames, so footprints cut at borders grow back whole) ->
quality per component -> `Result`.

Out of core: the refinement (`jaxcnmf.refine`) never holds the movie. Every pass reads a band of rows in chunks of
frames from the `MovieSource` and keeps only that band's statistics, `(band pixels, components in reach)`; the spatial
and temporal stages of `fit` then run on an exactly compressed problem (see `compress_time` and `compress_pixels`).
Patch fits of a long movie see it binned in time (`patch_bin`). `memory_budget` sets the bins and the chunk length.
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
    "patch_bin",
    "parse_memory_budget",
    "chunk_frames_for_budget",
    "compress_time",
    "compress_pixels",
    "ProgressBar",
    "PatchJob",
    "run_patch_job",
]

DEFAULT_MEMORY_BUDGET = 2 * 2**30
# arrays of one chunk's size alive at once in a streamed pass (the read chunk, its device copy, the model A C + b f
# and the residual inside the jitted step, their products): measured ~7 on the spatial pass of a 192x192 movie
_CHUNK_COPIES = 8
# bytes per byte of a patch's float32 movie alive at once inside a patch fit (measured peak of `fit`: its
# initialisation held ~15 movie-sized arrays on a 256x256x1000 movie, the later stages ~7)
_PATCH_COPIES = 16
# memory of a fitting process before any movie: the runtime and the compiled programs (measured ~650 MB)
_FIT_BASE = 2**30
# fewest frames a patch fit is given when a long movie is binned in time to fit the budget
_MIN_FIT_FRAMES = 200
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


def read_window(source, box, chunk_frames: int, bin: int = 1) -> np.ndarray:
    """Frames of one patch `(T // bin, r1 - r0, c1 - c0)` float32, read chunk by chunk (peak memory: one chunk + the
    patch); with `bin > 1`, each output frame is the mean of `bin` consecutive frames (the last `T % bin` frames are
    left out), so a long movie's patch fits on a shorter movie.

    A memory-mapped movie (`.npy`, uncompressed TIFF) without non-finite values is sliced directly, so only the
    patch's rows are read from disk; other sources are read a chunk of whole frames at a time.

    **Arguments:**

    - `source`: a `MovieSource`; `box`: `(r0, r1, c0, c1)`; `chunk_frames`: frames per read; `bin`: frames per bin.

    **Returns:** float32 array.
    """
    r0, r1, c0, c1 = (int(x) for x in box)
    bin = max(1, int(bin))
    T = (len(source) // bin) * bin
    out = np.empty((T // bin, r1 - r0, c1 - c0), np.float32)
    mapped = _mapped_array(source)
    step = max(bin, (max(1, int(chunk_frames)) // bin) * bin)
    for start in range(0, T, step):
        stop = min(start + step, T)
        if mapped is not None:
            chunk = np.asarray(mapped[start:stop, r0:r1, c0:c1], np.float32)
        else:
            chunk = source.read(start, stop)[:, r0:r1, c0:c1]
        release_pages(source)
        if bin > 1:
            chunk = chunk.reshape(-1, bin, r1 - r0, c1 - c0).mean(axis=1, dtype=np.float64)
        out[start // bin:stop // bin] = chunk
    return out


def resident_bytes() -> int | None:
    """This process's current resident memory in bytes (Linux `/proc/self/statm`; `None` where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def relieve_memory(budget: int | None = None, fraction: float = 0.5) -> bool:
    """Give freed memory back to the system, and drop JAX's compiled programs when this process still holds more
    than `fraction` of `budget`.

    Patch fits compile programs for each new number of components; kept, they add up (about 0.1 GB per patch on a
    96x96 patch) and would grow without bound over hundreds of patches; dropping them costs recompilation. Freed
    heap memory stays with the process until `malloc_trim` (glibc) returns it: measured on 96x96 patch fits, the
    resident memory between patches fell from 1.1 GB to 0.4 GB with both.

    **Arguments:** `budget` bytes (`None`: never drop the compiled programs); `fraction` of it that triggers the drop.

    **Returns:** True when the compiled programs were dropped.
    """
    import gc

    from .init import release_free_memory

    gc.collect()
    release_free_memory()
    if budget is None:
        return False
    rss = resident_bytes()
    if rss is None or rss <= fraction * budget:
        return False
    import jax

    jax.clear_caches()
    gc.collect()
    release_free_memory()
    return True


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
    parameters (a dict of `fit.Params` fields, `fps` already divided by `bin`), a checkpoint file (or `None`), the
    chunk length for reading and the frames per bin the fit sees (1: the movie's own frames)."""

    movie: Any
    box: tuple[int, int, int, int]
    params: dict
    checkpoint: str | None = None
    chunk_frames: int = 1000
    bin: int = 1
    memory_budget: int | None = None


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
    window = read_window(source, job.box, job.chunk_frames, job.bin)
    result = _fit_window(window, job.params)
    del window
    relieve_memory(job.memory_budget)
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
    from ._threads import Pool

    with Pool(len(devs)) as pool:
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
    """Whole-field start for the refinement: A `(d, K)` unit-norm (a `scipy.sparse` CSC matrix), C `(K, T')`, b
    `(d, nb)`, f `(nb, T')`, sn `(H, W)`, `patch` `(K,)` the patch each component came from, `merges` the number of
    cross-border merges, `bin` the frames per bin the patch fits saw (T' = T // bin; 1: the movie's own rate)."""

    A: Any
    C: np.ndarray
    b: np.ndarray
    f: np.ndarray
    sn: np.ndarray
    patch: np.ndarray
    merges: int
    bin: int = 1


def stitch_patches(results: Sequence[Result], boxes: np.ndarray, shape: tuple[int, int], *, merge_thr: float = 0.85,
                   bin: int = 1) -> Stitched:
    """Put the patch fits together on the whole field.

    1. Each component is kept only by the patch that owns its centre of mass (`owner_map`), so a neuron seen by two
       overlapping patches is kept once.
    2. Components from different patches whose footprints overlap and whose traces correlate above `merge_thr` (the
       same neuron, its centre estimated on either side of the split line) are merged (rank-1 NMF of their joint
       contribution, as `merge.merge_components`).
    3. Noise: each pixel's `sn` from the patch that owns it (per-pixel estimates do not depend on the patch).
       Background: traces `f` = the leading `nb` right singular vectors of all patches' background contributions,
       footprints `b` = each owned pixel's least-squares fit of its patch's `b f` on them (the refinement refits both).

    Footprints are kept sparse (a large field holds many small footprints).

    **Arguments:**

    - `results`: the patch `Result`s; `boxes`: `(n, 4)` patches; `shape`: `(H, W)`; `merge_thr`: correlation threshold.
    - `bin`: frames per bin of the patch fits (recorded in the result for the refinement).

    **Returns:** a `Stitched`.
    """
    import scipy.sparse

    from .refine import merge_sparse

    H, W = shape
    d = H * W
    owner = owner_map(boxes, shape)
    T = int(results[0].f.shape[1])
    nb = int(results[0].b.shape[0])
    rows, cols, vals, traces, patch = [], [], [], [], []
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
            y, x = np.nonzero(A_p[k])
            rows.append((y + r0) * W + x + c0)
            cols.append(np.full(y.size, len(traces)))
            vals.append(A_p[k][y, x])
            traces.append(np.asarray(res.C[k], np.float32))
            patch.append(p)
    b, f = _stitch_background(results, boxes, owner, (H, W), nb, T)
    if not traces:
        return Stitched(scipy.sparse.csc_matrix((d, 0), dtype=np.float32), np.zeros((0, T), np.float32), b, f, sn,
                        np.zeros(0, int), 0, bin)
    A = scipy.sparse.csc_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                                shape=(d, len(traces)))
    C = np.stack(traces)
    patch = np.asarray(patch)
    groups = _cross_patch_groups(A, C, patch, merge_thr)
    if groups:
        A, C, source = merge_sparse(A, C, groups)
        patch = patch[source]
    return Stitched(A, C.astype(np.float32), b, f, sn, patch, len(groups), bin)


def _cross_patch_groups(A, C, patch, thr) -> list[list[int]]:
    """Connected sets of components from different patches with overlapping footprints and traces correlated > thr."""
    import scipy.sparse
    import scipy.sparse.csgraph

    from .merge import trace_correlation
    from .temporal import overlap_graph

    linked = overlap_graph(A) & (trace_correlation(C) > thr) & (patch[:, None] != patch[None, :])
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
    traces by M (plus a zero column); the eigenvectors are taken of F's rows scaled to unit norm (F = S F_n, so
    Q = E^{-1/2} V' F_n and M = S V E^{1/2}), so that the rank does not depend on the traces' units. Then q, G and
    ||r_i||^2 are unchanged; the noise budget sn^2 T is kept by
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
    # rank decided on unit-norm rows (F = S F_n): traces in movie units and a unit-rms background trace differ by
    # orders of magnitude, and a threshold relative to the largest eigenvalue of F F' would drop the small ones
    s = np.linalg.norm(F, axis=1)
    s = np.where(s > 0, s, 1.0)
    e, V = np.linalg.eigh((F @ F.T) / np.outer(s, s))
    keep = e > rtol * max(e.max(initial=0.0), 1e-300)
    e, V = e[keep], V[:, keep]
    Vs = V / np.sqrt(e) / s[:, None]  # S^-1 V E^{-1/2}
    M = V * np.sqrt(e) * s[:, None]  # S V E^{1/2}
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

    The temporal update sees the movie only through M'Y with M = [A b] (and M'M). With M = M_n S (unit-norm columns)
    and M_n'M_n = U D U' (rank r), the movie P Y (r, T) with P = D^{-1/2} U' M_n' and footprints D^{1/2} U' S (split
    into the A and b parts) reproduce M'Y and M'M exactly (M'Y lies in the row space of M').

    **Arguments:**

    - `MY`: `(K + nb, T)` = [A b]' Y, streamed; `A` `(d, K)` (dense or `scipy.sparse`); `b` `(d, nb)`.
    - `rtol`: eigenvalues below `rtol * max` are dropped.

    **Returns:** `(Yp (r, T), Ap (r, K), bp (r, nb))`, float64 if `MY` is float64, else float32.
    """
    import scipy.sparse

    out = np.float64 if np.asarray(MY).dtype == np.float64 else np.float32
    K = A.shape[1]
    G = _gram(scipy.sparse.hstack([scipy.sparse.csc_matrix(A), scipy.sparse.csc_matrix(np.asarray(b))]))
    # rank decided on unit-norm columns (M = M_n S): a bright background map is orders of magnitude larger than the
    # unit-norm footprints, and a threshold relative to the largest eigenvalue of M'M would drop the footprints
    s = np.sqrt(np.maximum(np.diag(G), 0.0))
    s = np.where(s > 0, s, 1.0)
    D, U = np.linalg.eigh(G / np.outer(s, s))
    keep = D > rtol * max(D.max(initial=0.0), 1e-300)
    D, U = D[keep], U[:, keep]
    Yp = (U / np.sqrt(D)).T @ (np.asarray(MY, np.float64) / s[:, None])
    P = (U * np.sqrt(D)).T * s[None, :]
    return Yp.astype(out), P[:, :K].astype(out), P[:, K:].astype(out)


def _gram(M: np.ndarray) -> np.ndarray:
    """M'M in float64 from a mostly-zero `(d, n)` matrix (sparse product)."""
    import scipy.sparse

    S = scipy.sparse.csc_matrix(M)  # no dense float64 copy of M
    return (S.T @ S).toarray().astype(np.float64)


# -------------------------------------------------------------------------------------------------- streamed passes


class Streamer:
    """Passes over a movie (or a band of its rows) in chunks of frames, with the pixels of each chunk sharded over
    the JAX devices (`NamedSharding` on a 1-D mesh): the statistics of a pass are `(pixels, components)` arrays,
    never the movie.

    **Arguments:**

    - `source`: a `MovieSource`; `chunk_frames`: frames per chunk; `devices`: as in `resolve_devices`.
    - `band_pixels`: a band's pixels are zero-padded to at least this many, so bands of unequal height share one
      compiled shape (zero pixels add nothing to any statistic).
    """

    def __init__(self, source, chunk_frames: int, devices=None, band_pixels: int | None = None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.source = source
        self.T, self.H, self.W = source.shape
        self.d = self.H * self.W
        self.chunk = max(1, min(int(chunk_frames), self.T))
        devs = resolve_devices(devices)
        self.n_dev = len(devs)
        self.band_pixels = int(band_pixels or 0)
        mesh = Mesh(np.asarray(devs), ("pix",))
        self.rows = NamedSharding(mesh, P("pix", None))  # (pixels, x) split by pixels
        self.cols = NamedSharding(mesh, P(None, "pix"))  # (frames, pixels) split by pixels
        self.vec = NamedSharding(mesh, P("pix"))
        self.rep = NamedSharding(mesh, P())
        self._jax = jax
        self._mapped = _mapped_array(source)

    def _geometry(self, rows):
        r0, r1 = (0, self.H) if rows is None else (int(rows[0]), int(rows[1]))
        n = (r1 - r0) * self.W
        dp = max(n, self.band_pixels) if rows is not None else n
        return r0, r1, n, -(-dp // self.n_dev) * self.n_dev

    def _put(self, x, sharding, pad_axis=None, size=None):
        x = np.asarray(x, np.float32)
        if pad_axis is not None and x.shape[pad_axis] != size:
            pad = [(0, 0)] * x.ndim
            pad[pad_axis] = (0, size - x.shape[pad_axis])
            x = np.pad(x, pad)
        return self._jax.device_put(x, sharding)

    def read(self, start: int, stop: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Frames `start..stop` of rows `r0..r1`, float32 `(n, r1 - r0, W)` (memory-mapped movies: only those rows
        are read; mapped pages are released after each read)."""
        r1 = self.H if r1 is None else r1
        if self._mapped is not None:
            out = np.asarray(self._mapped[start:stop, r0:r1], np.float32)
        else:
            out = np.ascontiguousarray(self.source.read(start, stop)[:, r0:r1])
        release_pages(self.source)
        return out

    def _chunks(self, rows):
        r0, r1, n_px, dp = self._geometry(rows)
        for start in range(0, self.T, self.chunk):
            stop = min(start + self.chunk, self.T)
            n = stop - start
            Y = self.read(start, stop, r0, r1).reshape(n, n_px)
            if n < self.chunk or dp != n_px:
                Y = np.pad(Y, ((0, self.chunk - n), (0, dp - n_px)))
            yield start, n, self._put(Y, self.cols)

    def _window(self, X, start, n):
        """Columns `start..start+n` of a `(r, T)` array, zero-padded to the chunk length."""
        out = np.zeros((X.shape[0], self.chunk), np.float32)
        out[:, :n] = X[:, start:start + n]
        return self._put(out, self.rep)

    def residual_statistics(self, A, C, b, f, rows=None):
        """One pass: Zq = z F' `(pixels, K + nb)` and zz = ||z_i||^2 `(pixels,)`, z = y - A C - b f, F = [C; f],
        over the whole field or the band `rows = (r0, r1)` (then `A`, `b` hold the band's pixels). K is padded to a
        few fixed sizes (empty components) so that passes with different K share compiled shapes."""
        import jax.numpy as jnp

        from .temporal import bucket

        _, _, n_px, dp = self._geometry(rows)
        K = A.shape[1]
        Kp = bucket(max(K, 1))
        Ap, Cp = np.pad(np.asarray(A, np.float32), ((0, 0), (0, Kp - K))), np.pad(np.asarray(C, np.float32),
                                                                                  ((0, Kp - K), (0, 0)))
        Ad, bd = self._put(Ap, self.rows, 0, dp), self._put(b, self.rows, 0, dp)
        Zq = self._jax.device_put(jnp.zeros((dp, Kp + f.shape[0]), jnp.float32), self.rows)
        zz = self._jax.device_put(jnp.zeros((dp,), jnp.float32), self.vec)
        for start, n, Y in self._chunks(rows):
            Zq, zz = _residual_chunk(Zq, zz, Y, Ad, bd, self._window(Cp, start, n), self._window(f, start, n))
        Zq = np.asarray(Zq)[:n_px]
        return np.concatenate([Zq[:, :K], Zq[:, Kp:]], axis=1), np.asarray(zz)[:n_px]

    def project(self, M, rows=None):
        """One pass: M'Y `(m, T)` for `M` `(pixels, m)` (whole field, or the band `rows`)."""
        from .temporal import bucket

        _, _, _, dp = self._geometry(rows)
        m = M.shape[1]
        Md = self._put(np.pad(np.asarray(M, np.float32), ((0, 0), (0, bucket(m) - m))), self.rows, 0, dp)
        out = np.zeros((m, self.T), np.float32)
        for start, n, Y in self._chunks(rows):
            out[:, start:start + n] = np.asarray(_project_chunk(Y, Md))[:m, :n]
        return out

    def weighted(self, Wt, rows=None):
        """One pass: Y Wt `(pixels, m)` = sum over frames t of y_t Wt[t] for `Wt` `(T, m)` (whole field or band)."""
        import jax.numpy as jnp

        from .temporal import bucket

        _, _, n_px, dp = self._geometry(rows)
        m = Wt.shape[1]
        WtT = np.pad(np.asarray(Wt, np.float32).T, ((0, bucket(m) - m), (0, 0)))
        acc = self._jax.device_put(jnp.zeros((dp, WtT.shape[0]), jnp.float32), self.rows)
        for start, n, Y in self._chunks(rows):
            acc = _weighted_chunk(acc, Y, self._window(WtT, start, n))
        return np.asarray(acc)[:n_px, :m]


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


@_jit
def _weighted_chunk(acc, Y, WtT):
    return acc + Y.T @ WtT.T


# --------------------------------------------------------------------------------------------------------- refinement


def refine(source, start: "Stitched", prm, **kw) -> Result:
    """Whole-field refinement of a stitched start, out of core and band by band: see `jaxcnmf.refine.refine`."""
    from .refine import refine as _refine

    return _refine(source, start, prm, **kw)


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
                 memory_budget=None, max_fit_frames: int | None = None, tag: str = "", **overrides) -> PatchPlan:
    """Check everything and lay out the jobs of a patch run, before any heavy work (see `fit_patches`)."""
    from .fit import check_movie_shape, make_params, min_frames
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
    bin = patch_bin(T, ph * pw, budget, max_fit_frames, min_frames(prm), memory_budget, patch_size)
    need = _PATCH_COPIES * 4 * (T // bin) * ph * pw
    chunk = chunk_frames_for_budget(budget, H * W, reserved_bytes=need + _FIT_BASE, n_frames=T)
    job_params = prm.to_dict()
    if bin > 1 and prm.fps is not None:
        job_params = {**job_params, "fps": prm.fps / bin}
    checkpoints = prepare_checkpoints(checkpoint_dir, boxes, source, {**job_params, "bin": bin}, tag=tag)
    movie_ref = source.path if source.path is not None else source
    jobs = [PatchJob(movie_ref, tuple(int(x) for x in box), job_params, ck, chunk, bin,
                     budget if memory_budget is not None else None)
            for box, ck in zip(boxes, checkpoints)]
    return PatchPlan(source, prm, boxes, chunk, jobs, budget)


def patch_bin(T: int, patch_pixels: int, budget: int, max_fit_frames: int | None = None, fewest: int = 1,
              memory_budget=None, patch_size=None) -> int:
    """Frames per bin for the patch fits: 1 when a patch of all `T` frames fits the budget (and `max_fit_frames`),
    else the smallest bin that makes it fit. Raises `ParameterError` when even binned patches cannot fit.

    **Arguments:** `T` frames; `patch_pixels` pixels per patch; `budget` bytes; `max_fit_frames` an optional cap on
    the frames a patch fit sees; `fewest` the fit's minimum number of frames; `memory_budget`, `patch_size` as given
    by the caller (for the message).

    **Returns:** the bin (int >= 1).
    """
    per_frame = _PATCH_COPIES * 4 * patch_pixels
    fit_frames = (budget - _FIT_BASE) // per_frame
    if fit_frames < min(T, max(int(fewest), _MIN_FIT_FRAMES)):
        side = int(math.sqrt(max(budget - _FIT_BASE, 0) / (_PATCH_COPIES * 4 * min(T, _MIN_FIT_FRAMES))))
        raise ParameterError(
            f"memory_budget={memory_budget!r} ({budget / 2**30:.2f} GiB): a patch fit needs about "
            f"{(_FIT_BASE + per_frame * min(T, _MIN_FIT_FRAMES)) / 2**30:.2f} GiB for patch_size={patch_size!r} even "
            f"on {min(T, _MIN_FIT_FRAMES)} frames; use a larger budget" + (f" or patch_size <= {side}" if side else ""))
    if max_fit_frames is not None:
        if isinstance(max_fit_frames, bool) or not isinstance(max_fit_frames, (int, np.integer)) or max_fit_frames < 1:
            raise ParameterError(f"max_fit_frames={max_fit_frames!r}: expected a positive number of frames (or None)")
        fit_frames = min(fit_frames, int(max_fit_frames))
    bin = max(1, -(-T // fit_frames))
    if T // bin < fewest:
        raise ParameterError(f"max_fit_frames={max_fit_frames!r}: the patch fits would see {T // bin} frames, fewer "
                             f"than the {fewest} a fit needs; raise it")
    return bin


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
    start = stitch_patches(results, plan.boxes, (H, W), merge_thr=plan.prm.merge_thr, bin=plan.jobs[0].bin)
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
                max_fit_frames: int | None = None, progress: bool = False, **overrides) -> Result:
    """Fit CNMF to a large field of view patch by patch, stitch, and refine on the whole field (`patch_size` replaces
    CaImAn's `rf`, about `patch_size / 2`; `overlap` its `stride`).

    1. Tile the field into equal overlapping patches (`patch_grid`); each is fitted by `fit.fit` with the same
       parameters (one compiled shape serves all). With `checkpoint_dir`, each patch result is written atomically as
       soon as it is done, and a rerun (e.g. after the process was killed) loads finished patches instead of fitting
       them again; the final result is the same as an uninterrupted run's.
    2. `stitch_patches`: each component is kept by the patch owning its centre; duplicates across borders merged.
    3. `refine`: `n_refine` whole-field spatial + temporal updates, streamed from the movie band by band of rows and
       chunk by chunk of frames (out of core, footprints kept sparse), seeded by the stitched footprints and traces,
       then quality per component.

    Long movies: when a patch of all frames would not fit `memory_budget` (or `max_fit_frames`), the patch fits see
    the movie in bins of consecutive frames (each the mean of its frames; the noise is then averaged down, which
    helps finding cells); the refinement then estimates the noise and the traces at the movie's own rate, so the
    result is at full rate. Peak memory is about the budget: the patch fits and the passes' chunks are sized from it.

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
      the frames per bin of the patch fits; refuses patches too large to fit even binned.
    - `max_fit_frames`: most frames a patch fit sees (longer movies are binned; default: from `memory_budget`).
    - `n_refine`: whole-field refinement iterations; `progress`: a progress bar with time remaining on stderr.

    **Returns:** a `Result` for the whole field, laid out and ordered like `fit`'s; its `params` also record
    `patch_size` and `n_patches`.
    """
    plan = plan_patches(movie, neuron_radius, patch_size=patch_size, overlap=overlap, params=params,
                        checkpoint_dir=checkpoint_dir, memory_budget=memory_budget, max_fit_frames=max_fit_frames,
                        **overrides)
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
