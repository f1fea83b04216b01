"""Movie readers (lazy, chunked, memory-mapped where the file allows), movie writers, and result files.

It sits at both ends of the pipeline: `open_movie` turns a file or array into a `MovieSource` that every stage reads in
chunks of frames; `save_result` / `load_result` write and read the frozen `Result` atomically (see `atomic_output`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ._version import __version__
from .errors import MovieError, ParameterError, ResultFileError
from .result import OPTIONAL_FIELDS, REQUIRED_FIELDS, Result

__all__ = [
    "MovieSource",
    "open_movie",
    "load_movie",
    "save_movie",
    "save_result",
    "load_result",
    "atomic_output",
    "DEFAULT_CHUNK_BYTES",
]

# A chunk of float32 frames is at most this large unless the caller asks otherwise (one frame at least).
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Classic TIFF stores 32-bit offsets that some readers treat as signed: above this size we write BigTIFF.
_BIGTIFF_BYTES = 2**31 - 2**25
_TIFF_EXTS = (".tif", ".tiff")
_H5_EXTS = (".h5", ".hdf5", ".hdf", ".he5")
_NPY_EXTS = (".npy",)
_SUPPORTED_TEXT = (
    "a multi-page .tif/.tiff (or BigTIFF), a folder of single-frame .tif/.tiff files (or its parent holding "
    "'images/'), a .npy file, an HDF5 dataset as 'file.h5:/dataset' (.h5/.hdf5/.hdf/.he5), or a (frames, height, "
    "width) numpy array"
)
_H5_SPEC = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5))(?::(?P<dataset>.*))?$", re.IGNORECASE | re.DOTALL)
_NONFINITE_MODES = ("raise", "repair")
_HDF5_HINT = "install h5py with `pip install jaxcnmf[hdf5]` (or `pip install h5py`)"


# ----------------------------------------------------------------------------------------------------------- helpers


def _import_h5py(what: str, error=MovieError):
    """Import h5py or raise `error` saying how to install it."""
    try:
        import h5py
    except ImportError as e:
        raise error(f"{what} needs h5py, which is not installed: {_HDF5_HINT}") from e
    return h5py


def _check_dtype(dtype: np.dtype, where: str) -> np.dtype:
    """Accept unsigned/signed integer and real floating dtypes; anything else is a `MovieError`."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise MovieError(
            f"{where} has dtype {dtype}, which is not a movie intensity type; jaxcnmf reads unsigned/signed integers "
            f"(uint8, uint16, int16, ...) and real floats (float32, float64). Convert it first, e.g. "
            f"`movie.astype(np.float32)` for real data."
        )
    return dtype


def _check_shape(shape: tuple, where: str) -> tuple[int, int, int]:
    """A movie is (frames, height, width) with non-empty frames."""
    if len(shape) != 3:
        raise MovieError(
            f"{where} has shape {tuple(shape)} ({len(shape)} dimensions), but a movie must have 3: (frames, height, "
            f"width). For one image use `image[None]`; for multi-channel or multi-plane data pass one channel/plane."
        )
    T, H, W = (int(n) for n in shape)
    if H == 0 or W == 0:
        raise MovieError(f"{where} has empty frames (shape {tuple(shape)}); each frame needs at least one pixel.")
    return T, H, W


def _natural_key(name: str) -> list:
    """Sort key that orders 'image2' before 'image10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_list(frames: np.ndarray, limit: int = 5) -> str:
    """'4, 17, 99' or '4, 17, 99, 120, 121, ... (12 in all)'."""
    shown = ", ".join(str(int(i)) for i in frames[:limit])
    return shown if len(frames) <= limit else f"{shown}, ... ({len(frames)} in all)"


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect what tifffile logs at ERROR level (it logs, rather than raises, on truncated page chains)."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Collect(level=logging.ERROR)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------------------------------------- readers
# A reader knows one storage layout. It has `.shape` (T, H, W), `.dtype` (on disk), `.memmapped`, `.path`, and
# `read_raw(start, stop)` returning frames start..stop-1 in the on-disk dtype. Readers never convert or repair.


class _ArrayReader:
    """An in-memory array or a read-only memory map (`.npy`, uncompressed contiguous TIFF)."""

    def __init__(self, array: np.ndarray, path: str | None, memmapped: bool):
        self.array = array
        self.path = path
        self.memmapped = memmapped
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = array.dtype

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def close(self) -> None:
        pass


class _TiffPagesReader:
    """A compressed or non-contiguous multi-page TIFF: frames are decoded page by page, only those asked for."""

    memmapped = False

    def __init__(self, path: str, tif, shape: tuple[int, int, int], dtype: np.dtype):
        self.path = path
        self._tif = tif
        self.shape = shape
        self.dtype = dtype

    def _file(self):
        if self._tif is None or self._tif.filehandle.closed:
            import tifffile

            self._tif = tifffile.TiffFile(self.path)
        return self._tif

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0,) + self.shape[1:], self.dtype)
        try:
            data = self._file().asarray(key=range(start, stop), series=0)
        except Exception as e:  # tifffile raises many types on corrupt data (ValueError, zlib.error, struct.error, ...)
            raise MovieError(
                f"TIFF file '{self.path}' could not be decoded at frames {start}..{stop - 1} ({type(e).__name__}: "
                f"{e}); the file is corrupt or truncated: re-export or re-copy it."
            ) from e
        return data.reshape((stop - start,) + self.shape[1:])

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __getstate__(self):
        return {**self.__dict__, "_tif": None}


class _TiffFolderReader:
    """A folder of single-frame TIFF files, one frame per file in natural sort order (NeuroFinder `images/`)."""

    memmapped = False

    def __init__(self, path: str, files: list[str], frame_shape: tuple[int, int], dtype: np.dtype):
        self.path = path
        self.files = files
        self.shape = (len(files),) + frame_shape
        self.dtype = dtype

    def read_frame(self, i: int) -> np.ndarray:
        import tifffile

        name = self.files[i]
        try:
            frame = tifffile.imread(name)
        except Exception as e:
            raise MovieError(
                f"frame {i} of folder '{self.path}' ('{name}') could not be read ({type(e).__name__}: {e}); the file "
                f"is corrupt or truncated: re-copy it or remove it from the folder."
            ) from e
        frame = np.asarray(frame)
        if frame.ndim == 3 and frame.shape[0] == 1:
            frame = frame[0]
        if frame.shape != self.shape[1:] or frame.dtype != self.dtype:
            raise MovieError(
                f"frame {i} of folder '{self.path}' ('{name}') has shape {frame.shape} and dtype {frame.dtype}, but "
                f"the first frame has shape {self.shape[1:]} and dtype {self.dtype}; every file must hold one frame of "
                f"the same size and type."
            )
        return frame

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0),) + self.shape[1:], self.dtype)
        for j, i in enumerate(range(start, stop)):
            out[j] = self.read_frame(i)
        return out

    def close(self) -> None:
        pass


class _H5Reader:
    """A 3-D HDF5 dataset, read by slices of frames (h5py reads only the chunks it needs)."""

    memmapped = False

    def __init__(self, path: str, file: str, dataset: str, shape: tuple[int, int, int], dtype: np.dtype):
        self.path = path
        self.file = file
        self.dataset = dataset
        self.shape = shape
        self.dtype = dtype
        self._h5 = None

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        if self._h5 is None or not self._h5.id.valid:
            h5py = _import_h5py(f"reading '{self.path}'")
            self._h5 = h5py.File(self.file, "r")
        try:
            return np.asarray(self._h5[self.dataset][start:stop])
        except Exception as e:
            raise MovieError(
                f"HDF5 dataset '{self.path}' could not be read at frames {start}..{stop - 1} ({type(e).__name__}: "
                f"{e}); the file is corrupt or truncated: re-copy it."
            ) from e

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getstate__(self):
        return {**self.__dict__, "_h5": None}


def _open_npy(path: str) -> _ArrayReader:
    """Memory-map a `.npy` file read-only."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise MovieError(
            f".npy file '{path}' could not be opened ({type(e).__name__}: {e}); it is corrupt, truncated or holds "
            f"Python objects: re-save it with `np.save(path, movie)`."
        ) from e
    _check_dtype(array.dtype, f".npy file '{path}'")
    _check_shape(array.shape, f".npy file '{path}'")
    return _ArrayReader(array, path, memmapped=True)


def _tiff_geometry(path: str, series) -> tuple[tuple[int, int, int], np.dtype]:
    """(T, H, W) and dtype of a TIFF series, or a `MovieError` for colour / multi-channel / volumetric layouts."""
    shape, axes = tuple(series.shape), series.axes
    if "S" in axes and shape[axes.index("S")] > 1:
        raise MovieError(
            f"TIFF file '{path}' holds colour (RGB) frames of shape {shape} (axes {axes}); jaxcnmf needs one intensity "
            f"channel: convert the movie to grayscale or save one channel."
        )
    if len(shape) == 2:
        shape = (1,) + shape
    return _check_shape(shape, f"TIFF file '{path}' (axes {axes})"), np.dtype(series.dtype)


def _open_tiff(path: str) -> _ArrayReader | _TiffPagesReader:
    """Memory-map an uncompressed contiguous TIFF; otherwise decode pages on demand. Corrupt files are `MovieError`s."""
    import tifffile

    size = os.path.getsize(path)
    what = f"TIFF file '{path}'"
    fix = "the file is truncated or corrupt: re-export or re-copy it"
    with _tifffile_errors() as logged:
        try:
            tif = tifffile.TiffFile(path)
            tif.pages.useframes = True  # walk the whole page chain cheaply: a broken chain is logged, caught below
            _ = tif.pages[-1] if len(tif.pages) else None
            series = tif.series[0] if tif.series else None
            n_pages = len(series.pages) if series is not None and series.dataoffset is None else None
        except Exception as e:
            raise MovieError(f"{what} could not be opened ({type(e).__name__}: {e}); {fix}.") from e
    if logged or series is None:
        tif.close()
        reason = "; ".join(logged) if logged else "no image data found"
        raise MovieError(f"{what} is not a readable movie ({reason}); {fix}.")
    try:
        shape, dtype = _tiff_geometry(path, series)
        _check_dtype(dtype, what)
        if series.dataoffset is not None:  # uncompressed and contiguous: memory-map it
            end = series.dataoffset + int(np.prod(shape)) * dtype.itemsize
            if end > size:
                raise MovieError(f"{what} is {size} bytes but its image data ends at byte {end}; {fix}.")
            array = tifffile.memmap(path, mode="r", series=0).reshape(shape)
            tif.close()
            return _ArrayReader(array, path, memmapped=True)
        if n_pages != shape[0]:
            raise MovieError(
                f"{what} has {n_pages} pages for {shape[0]} frames (shape {shape}); jaxcnmf reads one frame per page: "
                f"re-save it with one frame per page, e.g. `tifffile.imwrite(path, movie)`."
            )
        for k, page in enumerate(series.pages):
            ends = [] if page is None else [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
            if page is None or (ends and max(ends) > size):
                raise MovieError(f"{what}: the data of frame {k} lies past the end of the file ({size} bytes); {fix}.")
    except BaseException:
        tif.close()
        raise
    return _TiffPagesReader(path, tif, shape, dtype)


def _open_tiff_folder(path: str) -> _TiffFolderReader:
    """A folder of single-frame TIFFs, or a folder whose `images/` subfolder holds them (NeuroFinder layout)."""
    import tifffile

    folder = os.path.join(path, "images") if os.path.isdir(os.path.join(path, "images")) else path
    names = sorted(
        (n for n in os.listdir(folder) if n.lower().endswith(_TIFF_EXTS) and not n.startswith(".")), key=_natural_key
    )
    if not names:
        raise MovieError(
            f"folder '{folder}' holds no .tif/.tiff files; a movie folder holds one single-frame TIFF per frame "
            f"(NeuroFinder layout: images/image00000.tiff, ...). Pass a movie file or the right folder."
        )
    files = [os.path.join(folder, n) for n in names]
    try:
        with tifffile.TiffFile(files[0]) as tif:
            shape, dtype = tuple(tif.series[0].shape), np.dtype(tif.series[0].dtype)
    except Exception as e:
        raise MovieError(
            f"first frame '{files[0]}' of folder '{folder}' could not be opened ({type(e).__name__}: {e}); it is "
            f"corrupt or truncated: re-copy it."
        ) from e
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise MovieError(
            f"'{files[0]}' in folder '{folder}' holds an array of shape {shape}, not one 2-D frame; a movie folder "
            f"holds one single-frame TIFF per frame. Pass a multi-page TIFF as a file instead."
        )
    _check_dtype(dtype, f"folder '{folder}'")
    _check_shape((len(files),) + shape, f"folder '{folder}'")
    return _TiffFolderReader(folder, files, shape, dtype)


def _h5_datasets(h5, h5py) -> list[tuple[str, tuple]]:
    """(name, shape) of every dataset in an open HDF5 file."""
    found = []
    h5.visititems(lambda name, obj: found.append(("/" + name, obj.shape)) if isinstance(obj, h5py.Dataset) else None)
    return found


def _open_h5(file: str, dataset: str | None) -> _H5Reader:
    """One 3-D dataset of an HDF5 file; `dataset=None` picks the only 3-D dataset in the file."""
    h5py = _import_h5py(f"reading HDF5 file '{file}'")
    spec = f"{file}:{dataset}" if dataset is not None else file
    try:
        h5 = h5py.File(file, "r")
    except Exception as e:
        raise MovieError(
            f"HDF5 file '{file}' could not be opened ({type(e).__name__}: {e}); it is not HDF5, or it is corrupt or "
            f"truncated: re-copy it."
        ) from e
    with h5:
        datasets = _h5_datasets(h5, h5py)
        listing = ", ".join(f"{n} {s}" for n, s in datasets) or "none"
        movies = [n for n, s in datasets if len(s) == 3]
        if dataset is not None and dataset.strip("/ ") == "":
            raise MovieError(
                f"HDF5 path '{spec}' names no dataset; write it as 'file.h5:/dataset'. Datasets in the file: {listing}."
            )
        if dataset is None:
            if len(movies) != 1:
                what = "no 3-D dataset" if not movies else f"{len(movies)} 3-D datasets"
                raise MovieError(
                    f"HDF5 file '{file}' has {what}; name the movie as 'file.h5:/dataset'. Datasets in the file: "
                    f"{listing}."
                )
            dataset = movies[0]
        if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
            kind = "is a group, not a dataset" if dataset in h5 else "does not exist"
            raise MovieError(
                f"HDF5 path '{spec}': '{dataset}' {kind}. Datasets in the file: {listing}; pass one as "
                f"'file.h5:/dataset'."
            )
        ds = h5[dataset]
        shape, dtype = tuple(ds.shape), ds.dtype
    where = f"HDF5 dataset '{file}:{dataset}'"
    _check_dtype(dtype, where)
    return _H5Reader(f"{file}:{dataset}", file, dataset, _check_shape(shape, where), np.dtype(dtype))


def _open_path(source: str) -> Any:
    """Pick the reader for a path (file, folder, or 'file.h5:/dataset')."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return _open_tiff_folder(path)
    h5 = None if os.path.exists(path) else _H5_SPEC.match(path)
    file, dataset = (h5["file"], h5["dataset"]) if h5 is not None else (path, None)
    if not os.path.exists(file):
        raise MovieError(f"movie file '{file}' does not exist; check the path (current folder: {os.getcwd()}).")
    ext = os.path.splitext(file)[1].lower()
    if ext in _H5_EXTS:
        return _open_h5(file, dataset)
    if ext in _TIFF_EXTS:
        return _open_tiff(file)
    if ext in _NPY_EXTS:
        return _open_npy(file)
    raise MovieError(
        f"movie file '{file}' has an unsupported extension '{ext or '(none)'}'. jaxcnmf reads {_SUPPORTED_TEXT}. "
        f"Convert it, e.g. save it with `jaxcnmf.save_movie('movie.tif', array)`."
    )


# ------------------------------------------------------------------------------------------------- non-finite repair


def _interpolate_nonfinite(values: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Fill non-finite entries of each column by linear interpolation in time between its nearest finite entries.

    Entries before the first finite one take its value, entries after the last take that one, and a column with no
    finite entry becomes 0.

    **Arguments:**

    - `values`: `(n, P)` samples, frames along axis 0.
    - `times`: `(n, P)` the frame time of each sample, increasing down each column.

    **Returns:**

    `(n, P)` float64 array equal to `values` where it is finite.
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    ok = np.isfinite(values)
    row = np.arange(n)[:, None]
    prev = np.maximum.accumulate(np.where(ok, row, -1), axis=0)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(ok, row, n), axis=0), axis=0), axis=0)
    has_prev, has_next = prev >= 0, nxt < n
    p, q = np.clip(prev, 0, n - 1), np.clip(nxt, 0, n - 1)
    vp, vq = np.take_along_axis(values, p, 0), np.take_along_axis(values, q, 0)
    tp, tq = np.take_along_axis(times, p, 0), np.take_along_axis(times, q, 0)
    both = has_prev & has_next & ~ok  # inside a gap: finite neighbours on both sides, at different times
    weight = np.where(both, times - tp, 0.0) / np.where(both, tq - tp, 1.0)
    between = vp + weight * (np.where(both, vq, 0.0) - np.where(both, vp, 0.0))
    one_side = np.where(has_prev, vp, np.where(has_next, vq, 0.0))
    filled = np.where(both, between, one_side)
    return np.where(ok, values, filled)


def _nearest_finite_outside(
    read, pixels: np.ndarray, edge: int, step: int, n_frames: int, forward: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For each flat pixel index, its nearest finite value (and frame) before `edge` (or from `edge` on, if forward).

    Reads blocks of `step` frames outward from `edge` until every pixel is found or the movie ends; NaN where none.
    """
    value = np.full(len(pixels), np.nan)
    frame = np.full(len(pixels), float(edge - 1 if not forward else edge))
    todo = np.ones(len(pixels), bool)
    pos = edge
    while todo.any() and (pos < n_frames if forward else pos > 0):
        a, b = (pos, min(n_frames, pos + step)) if forward else (max(0, pos - step), pos)
        idx = np.flatnonzero(todo)
        block = read(a, b).reshape(b - a, -1)[:, pixels[idx]]
        ok = np.isfinite(block)
        found = ok.any(axis=0)
        first = np.argmax(ok, axis=0) if forward else (b - a - 1) - np.argmax(ok[::-1], axis=0)
        hit = idx[found]
        value[hit] = block[first[found], np.flatnonzero(found)]
        frame[hit] = a + first[found]
        todo[hit] = False
        pos = b if forward else a
    return value, frame


def _repair_block(block: np.ndarray, start: int, read, n_frames: int, step: int) -> np.ndarray:
    """Replace the non-finite pixels of frames `start..` in place, interpolating each pixel in time (see above)."""
    n = block.shape[0]
    flat = block.reshape(n, -1)
    pixels = np.flatnonzero(~np.isfinite(flat).all(axis=0))
    left, t_left = _nearest_finite_outside(read, pixels, start, step, n_frames, forward=False)
    right, t_right = _nearest_finite_outside(read, pixels, start + n, step, n_frames, forward=True)
    inner_t = np.broadcast_to(np.arange(start, start + n, dtype=np.float64)[:, None], (n, len(pixels)))
    values = np.concatenate([left[None], flat[:, pixels], right[None]])
    times = np.concatenate([t_left[None], inner_t, t_right[None]])
    flat[:, pixels] = _interpolate_nonfinite(values, times)[1:-1]
    return block


# ------------------------------------------------------------------------------------------------------ MovieSource


class MovieSource:
    """A lazily read movie of `T` frames of `H x W` pixels; every read returns float32 `(frames, H, W)`.

    Make one with `open_movie`. Nothing is read until asked for: `read(start, stop)` reads those frames only and
    `iter_chunks(chunk_frames)` walks the movie a chunk at a time. `.npy` files and uncompressed TIFFs are memory-mapped
    (`memmapped` is True); compressed TIFFs, TIFF folders and HDF5 datasets decode only the frames asked for.

    **Attributes:**

    - `path`: the file, folder or 'file.h5:/dataset' read from; `None` for an in-memory array.
    - `shape`: `(T, H, W)`; `dtype`: the dtype on disk (reads convert it to float32).
    - `memmapped`: whether reads are slices of a memory map.
    - `nonfinite`: `"raise"` (a read meeting NaN/Inf raises `MovieError`) or `"repair"` (such pixels are replaced by
      linear interpolation in time between the pixel's nearest finite values; 0 if the pixel has none).
    - `nonfinite_frames`: indices of frames holding NaN/Inf found by `open_movie(check=True)`, or `None` if not scanned.
    - `frame_range`: `(lo, hi)`, each frame's minimum and maximum as float32 `(T,)` arrays (NaN where the frame holds
      a NaN), recorded by that scan of a floating-point movie; `None` otherwise.
    - `chunk_frames`: the default chunk length (`DEFAULT_CHUNK_BYTES` of float32, at least one frame).
    """

    def __init__(self, reader, *, nonfinite: str = "raise", nonfinite_frames: np.ndarray | None = None,
                 frame_range: tuple[np.ndarray, np.ndarray] | None = None):
        if nonfinite not in _NONFINITE_MODES:
            raise ParameterError(f"nonfinite={nonfinite!r} is not one of {_NONFINITE_MODES}.")
        self._reader = reader
        self.nonfinite = nonfinite
        self.nonfinite_frames = nonfinite_frames
        self.frame_range = frame_range

    path = property(lambda self: self._reader.path)
    shape = property(lambda self: tuple(self._reader.shape))
    dtype = property(lambda self: np.dtype(self._reader.dtype))
    memmapped = property(lambda self: bool(self._reader.memmapped))

    @property
    def chunk_frames(self) -> int:
        _, H, W = self.shape
        return max(1, DEFAULT_CHUNK_BYTES // (4 * H * W))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = f"'{self.path}'" if self.path is not None else "array"
        return f"MovieSource({where}, shape={self.shape}, dtype={self.dtype}, memmapped={self.memmapped})"

    def _read_float(self, start: int, stop: int) -> np.ndarray:
        """Frames start..stop-1 as a new float32 array, without the non-finite handling."""
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported as non-finite
            return np.array(self._reader.read_raw(start, stop), dtype=np.float32)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames `start` up to (not including) `stop` (Python slice rules; `None` means to the end).

        **Arguments:**

        - `start`, `stop`: frame indices.

        **Returns:**

        A new float32 array `(stop - start, H, W)`.
        """
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        block = self._read_float(start, stop)
        if self.dtype.kind != "f":
            return block  # integers are always finite in float32
        bad = ~np.isfinite(block).all(axis=(1, 2))
        if not bad.any():
            return block
        if self.nonfinite == "raise":
            frames = start + np.flatnonzero(bad)
            raise MovieError(
                f"movie {self._name()} has NaN/Inf values in frames {_frame_list(frames)} (read of frames "
                f"{start}..{stop - 1}); pass nonfinite='repair' (CLI: --repair-nonfinite) to replace them by each "
                f"pixel's nearest finite values in time, or fix the file."
            )
        return _repair_block(block, start, self._read_float, len(self), self.chunk_frames)

    def iter_chunks(self, chunk_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Walk the movie in consecutive chunks of frames.

        **Arguments:**

        - `chunk_frames`: frames per chunk (the last may be shorter); `None` uses `self.chunk_frames`.

        **Returns:**

        An iterator of `(start, chunk)` with `chunk` float32 `(n, H, W)` holding frames `start..start+n-1`.
        """
        step = self.chunk_frames if chunk_frames is None else chunk_frames
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise ParameterError(f"chunk_frames={chunk_frames!r} must be a positive integer number of frames.")
        for start in range(0, len(self), int(step)):
            yield start, self.read(start, start + int(step))

    def scan_nonfinite(self, chunk_frames: int | None = None) -> np.ndarray:
        """Indices of the frames holding NaN/Inf (after conversion to float32), read chunk by chunk; also records
        each frame's range (`frame_range`).

        A frame is finite exactly when its minimum and maximum are (both propagate NaN; a float64 value beyond
        float32's range makes one of them infinite once cast), so the scan takes two reductions of the raw frames
        and makes no float32 copy or boolean mask of them: on an in-memory 256x256x3000 float32 movie 0.28-0.66 s
        -> 0.10 s, and `fit` reuses the ranges for its own checks instead of two more passes over the movie.
        """
        if self.dtype.kind != "f":
            return np.zeros(0, np.int64)
        step = chunk_frames or self.chunk_frames
        lo, hi = [], []
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, len(self), step):
                raw = np.asarray(self._reader.read_raw(start, min(start + step, len(self))))
                lo.append(raw.min(axis=(1, 2)).astype(np.float32))
                hi.append(raw.max(axis=(1, 2)).astype(np.float32))
        if not lo:
            return np.zeros(0, np.int64)
        lo, hi = np.concatenate(lo), np.concatenate(hi)
        self.frame_range = (lo, hi)
        return np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))

    def close(self) -> None:
        """Close any open file handle (a later read reopens it)."""
        self._reader.close()

    def __enter__(self) -> "MovieSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _name(self) -> str:
        return f"'{self.path}'" if self.path is not None else "(numpy array)"


# ------------------------------------------------------------------------------------------------------ open / load


def open_movie(
    source: Any, *, nonfinite: str = "raise", min_frames: int = 1, check: bool = True
) -> MovieSource:
    """Open a movie for lazy, chunked reading, validating it before any heavy work.

    **Arguments:**

    - `source`: a path (multi-page `.tif`/`.tiff` or BigTIFF; a folder of single-frame TIFFs or its parent holding
      `images/`; `.npy`; `file.h5:/dataset`, or `file.h5` holding a single 3-D dataset), a `(T, H, W)` numpy array
      (uint8, uint16, int16, ... or float32/float64), or a `MovieSource`.
    - `nonfinite`: `"raise"` to reject NaN/Inf frames, `"repair"` to replace non-finite pixels by linear interpolation
      in time between the pixel's nearest finite values (0 if it has none), lazily, chunk by chunk.
    - `min_frames`: the fewest frames the caller can use.
    - `check`: scan float movies for NaN/Inf now (one chunked pass) and decode the first and last frame of a
      compressed file; `False` defers both to the reads.

    **Returns:**

    A `MovieSource`.

    **Raises:**

    `MovieError` for a missing file, an unknown extension, a shape that is not `(frames, height, width)`, fewer than
    `min_frames` frames, NaN/Inf frames (with `nonfinite="raise"`), a truncated or corrupt file, an empty or missing
    HDF5 dataset, or a dtype that is not integer or real float. `ParameterError` for bad arguments.
    """
    if nonfinite not in _NONFINITE_MODES:
        raise ParameterError(f"nonfinite={nonfinite!r} must be one of {_NONFINITE_MODES}.")
    if isinstance(min_frames, bool) or not isinstance(min_frames, (int, np.integer)) or min_frames < 1:
        raise ParameterError(f"min_frames={min_frames!r} must be a positive integer.")
    ranges = None
    if isinstance(source, MovieSource):
        reader, scanned, ranges = source._reader, source.nonfinite_frames, source.frame_range
    elif isinstance(source, (str, os.PathLike)):
        reader, scanned = _open_path(os.fspath(source)), None
    elif isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        array = np.asarray(source)
        _check_dtype(array.dtype, "movie array")
        _check_shape(array.shape, "movie array")
        reader, scanned = _ArrayReader(array, None, memmapped=isinstance(array, np.memmap)), None
    else:
        raise MovieError(f"cannot read a movie from a {type(source).__name__}; pass {_SUPPORTED_TEXT}.")
    movie = MovieSource(reader, nonfinite=nonfinite, nonfinite_frames=scanned, frame_range=ranges)
    name = movie._name()
    if len(movie) < min_frames:
        raise MovieError(
            f"movie {name} has {len(movie)} frame(s), but at least {min_frames} are needed (min_frames={min_frames}); "
            f"use a longer recording."
        )
    if check:
        if not reader.memmapped and len(movie) > 0:
            movie._read_float(0, 1), movie._read_float(len(movie) - 1, len(movie))  # surfaces corrupt data early
        if movie.nonfinite_frames is None:
            movie.nonfinite_frames = movie.scan_nonfinite()
        if nonfinite == "raise" and len(movie.nonfinite_frames):
            raise MovieError(
                f"movie {name} has NaN/Inf values in {len(movie.nonfinite_frames)} of {len(movie)} frames (frames "
                f"{_frame_list(movie.nonfinite_frames)}); pass nonfinite='repair' (CLI: --repair-nonfinite) to replace "
                f"them by each pixel's nearest finite values in time, or fix the file."
            )
    return movie


def load_movie(source: Any, **kw) -> np.ndarray:
    """The whole movie as one float32 `(T, H, W)` array (`open_movie(source, **kw).read()`).

    **Arguments:**

    - `source`, `**kw`: as for `open_movie`.

    **Returns:**

    A new float32 array `(T, H, W)`.
    """
    with open_movie(source, **kw) as movie:
        return movie.read()


# ----------------------------------------------------------------------------------------------------------- writers


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Write a file all-or-nothing: yield a temporary path in the same folder, rename it over `path` on success.

    The temporary name ends with the same extension as `path` (writers such as `np.save` key on it) and does not exist
    yet. On any exception, KeyboardInterrupt included, the temporary file is removed and `path` is left as it was.

    **Arguments:**

    - `path`: the file to write; its folder is created if missing.

    **Returns:**

    A context manager yielding the temporary path (str).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ParameterError(f"output path '{path}' is a folder; pass a file name.")
    folder, name = os.path.split(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ParameterError(f"cannot create the output folder '{folder}' ({e}); choose another path.") from e
    suffix = "".join(Path(name).suffixes[-1:])
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp{suffix}")
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise ResultFileError(f"the writer of '{path}' produced no file; nothing was written.")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _split_h5_target(path: str, default: str) -> tuple[str, str] | None:
    """('file.h5', '/dataset') for an HDF5 target, else None."""
    m = _H5_SPEC.match(path)
    if m is None:
        return None
    dataset = m["dataset"] if m["dataset"] is not None else default
    if dataset.strip("/ ") == "":
        raise MovieError(f"HDF5 target '{path}' names no dataset; write it as 'file.h5:/dataset'.")
    return m["file"], dataset


def _movie_frames(movie) -> tuple[tuple[int, int, int], np.dtype, Iterator[tuple[int, np.ndarray]]]:
    """Shape, dtype and a chunk iterator for an array or a `MovieSource` (streamed as float32)."""
    if isinstance(movie, MovieSource):
        return movie.shape, np.dtype(np.float32), movie.iter_chunks()
    array = np.asarray(movie)
    _check_dtype(array.dtype, "movie to save")
    shape = _check_shape(array.shape, "movie to save")
    step = max(1, DEFAULT_CHUNK_BYTES // max(1, shape[1] * shape[2] * array.dtype.itemsize))
    return shape, array.dtype, ((s, array[s : s + step]) for s in range(0, shape[0], step))


def save_movie(path: str | os.PathLike, movie: Any, *, bigtiff: bool | None = None) -> str:
    """Write a movie atomically as `.tif` (uncompressed, BigTIFF when over 2 GB), `.npy`, or `file.h5:/dataset`.

    Arrays keep their dtype; a `MovieSource` is streamed chunk by chunk as float32. An HDF5 target without a dataset
    name writes `/movie`; other datasets already in that file are kept.

    **Arguments:**

    - `path`: the output file.
    - `movie`: a `(T, H, W)` array or a `MovieSource`.
    - `bigtiff`: force BigTIFF on or off; `None` picks it for movies over 2 GB.

    **Returns:**

    The path written (for HDF5, 'file.h5:/dataset').
    """
    path = os.path.expanduser(os.fspath(path))
    h5 = _split_h5_target(path, "/movie")
    ext = os.path.splitext(path)[1].lower()
    if h5 is None and ext not in _TIFF_EXTS + _NPY_EXTS:
        raise MovieError(
            f"cannot write a movie to '{path}': unsupported extension '{ext or '(none)'}'; use .tif/.tiff, .npy or "
            f"'file.h5:/dataset'."
        )
    shape, dtype, chunks = _movie_frames(movie)
    if h5 is not None:
        file, dataset = h5
        h5py = _import_h5py(f"writing '{path}'")
        with atomic_output(file) as tmp:
            if os.path.exists(file):
                shutil.copyfile(file, tmp)
            with h5py.File(tmp, "a") as f:
                if dataset in f:
                    del f[dataset]
                rows = max(1, min(shape[0], 2**20 // max(1, shape[1] * shape[2] * dtype.itemsize)))
                chunking = (rows,) + shape[1:] if shape[0] else None
                ds = f.create_dataset(dataset, shape=shape, dtype=dtype, chunks=chunking)
                for start, chunk in chunks:
                    ds[start : start + len(chunk)] = chunk
        return f"{os.path.abspath(file)}:{dataset}"
    with atomic_output(path) as tmp:
        if ext in _NPY_EXTS:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for start, chunk in chunks:
                out[start : start + len(chunk)] = chunk
            out.flush()
            del out
        else:
            import tifffile

            big = bigtiff if bigtiff is not None else int(np.prod(shape)) * dtype.itemsize > _BIGTIFF_BYTES
            frames = (frame for _, chunk in chunks for frame in chunk)
            with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
                tw.write(frames, shape=shape, dtype=dtype, photometric="minisblack")
    return os.path.abspath(path)


# ------------------------------------------------------------------------------------------------------ result files


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars/arrays and paths in a params dict."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _params_json(params: Mapping, path: str) -> str:
    try:
        return json.dumps(dict(params), default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ResultFileError(
            f"cannot write '{path}': the result's params are not JSON-serialisable ({e}); keep params to numbers, "
            f"strings, lists and dicts."
        ) from e


def _check_layout(arrays: Mapping[str, np.ndarray], path: str) -> None:
    """Every required array present, with dimensions that agree: A (K,H,W), C/S/YrA (K,T), b (nb,H,W), f (nb,T), ..."""
    missing = [k for k in REQUIRED_FIELDS if k not in arrays]
    if missing:
        raise ResultFileError(
            f"result file '{path}' lacks the arrays {missing} (it has {sorted(arrays)}); a jaxcnmf result holds "
            f"{list(REQUIRED_FIELDS)}. Is it a jaxcnmf result file? Re-run the fit to write one."
        )
    dims = {"A": "KHW", "C": "KT", "S": "KT", "YrA": "KT", "b": "nHW", "f": "nT", "sn": "HW", "g": "Kp"}
    dims.update({k: "K" for k in ("baseline", "c1", "lam", "snr", "r_value", "accepted")}, centers="Kc")
    sizes: dict[str, tuple[int, str]] = {}
    for name, letters in dims.items():
        if name not in arrays:
            continue
        shape = np.shape(arrays[name])
        if len(shape) != len(letters):
            raise ResultFileError(
                f"result file '{path}': array '{name}' has shape {shape}, expected {len(letters)} dimensions "
                f"({', '.join(letters)}); the file is not a valid jaxcnmf result."
            )
        for letter, n in zip(letters, shape):
            if letter in "pc":
                continue
            seen = sizes.setdefault(letter, (n, name))
            if seen[0] != n:
                raise ResultFileError(
                    f"result file '{path}': '{name}' has {letter}={n} but '{seen[1]}' has {letter}={seen[0]}; the "
                    f"arrays do not belong to one fit."
                )


def save_result(path: str | os.PathLike, result: Result) -> str:
    """Write a `Result` atomically as `.h5` (one root dataset per array) or `.npz`, readable without jaxcnmf.

    Layout: `A` (K,H,W), `C`, `S`, `YrA` (K,T), `b` (nb,H,W), `f` (nb,T), `sn` (H,W), `g` (K,p), and the optional
    per-component arrays present; `params` (JSON string) and `jaxcnmf_version` are root attributes in HDF5 and 0-d
    string arrays in `.npz`.

    **Arguments:**

    - `path`: `.h5`/`.hdf5` or `.npz` file.
    - `result`: the `Result` to write.

    **Returns:**

    The absolute path written.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    ext = os.path.splitext(path)[1].lower()
    if not isinstance(result, Result):
        raise ResultFileError(f"cannot write '{path}': expected a jaxcnmf.Result, got {type(result).__name__}.")
    if ext not in (".h5", ".hdf5", ".npz"):
        raise ResultFileError(f"cannot write a result to '{path}': use a .h5/.hdf5 or .npz file name.")
    arrays = result.arrays()
    _check_layout(arrays, path)
    params = _params_json(result.params, path)
    version = result.version or __version__
    if ext == ".npz":
        with atomic_output(path) as tmp:
            np.savez_compressed(tmp, **arrays, params=np.array(params), jaxcnmf_version=np.array(version))
        return path
    h5py = _import_h5py(f"writing result file '{path}'", ResultFileError)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, value in arrays.items():
                big = value.size > 0 and value.ndim > 0
                f.create_dataset(name, data=value, **({"compression": "gzip", "compression_opts": 4} if big else {}))
            f.attrs["jaxcnmf_version"] = version
            f.attrs["params"] = params
    return path


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], str | None, str | None]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    params, version = arrays.pop("params", None), arrays.pop("jaxcnmf_version", None)
    return arrays, None if params is None else str(params), None if version is None else str(version)


def _read_h5(path: str) -> tuple[dict[str, np.ndarray], str | None, str | None]:
    h5py = _import_h5py(f"reading result file '{path}'", ResultFileError)
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
        params, version = f.attrs.get("params"), f.attrs.get("jaxcnmf_version")
    decode = lambda v: v.decode() if isinstance(v, bytes) else (None if v is None else str(v))  # noqa: E731
    return {k: np.asarray(v) for k, v in arrays.items()}, decode(params), decode(version)


def load_result(path: str | os.PathLike) -> Result:
    """Read a result file written by `save_result` (`.h5`/`.hdf5` or `.npz`).

    **Arguments:**

    - `path`: the result file.

    **Returns:**

    A `Result` with the stored arrays (same dtypes), `params` dict and `version`.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise ResultFileError(f"result file '{path}' does not exist; check the path or run the fit first.")
    if ext not in (".h5", ".hdf5", ".npz"):
        raise ResultFileError(f"result file '{path}' is not .h5/.hdf5 or .npz; jaxcnmf writes results as those.")
    try:
        arrays, params, version = (_read_npz if ext == ".npz" else _read_h5)(path)
    except ResultFileError:
        raise
    except Exception as e:
        raise ResultFileError(
            f"result file '{path}' could not be read ({type(e).__name__}: {e}); it is corrupt or truncated: write it "
            f"again."
        ) from e
    _check_layout(arrays, path)
    try:
        params_dict = json.loads(params) if params is not None else {}
    except ValueError as e:
        raise ResultFileError(f"result file '{path}': its 'params' are not valid JSON ({e}).") from e
    keep = {k: v for k, v in arrays.items() if k in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    return Result.from_arrays(keep, params=params_dict, version=version or "")
