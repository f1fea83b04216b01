"""Tests of jaxcnmf.io: movie readers and writers for every format and dtype, bad-input errors, atomic result files."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import tracemalloc

import numpy as np
import pytest
import tifffile

from jaxcnmf import io
from jaxcnmf.errors import JaxcnmfError, MovieError, ParameterError, ResultFileError
from jaxcnmf.result import Result
from tests.conftest import shared_path

h5py = pytest.importorskip("h5py")

DTYPES = [np.uint8, np.uint16, np.int16, np.float32, np.float64]
FORMATS = ["movie.tif", "movie.npy", "movie.h5:/data/mov", "movie.h5"]


def make_movie(dtype, shape=(10, 7, 5), seed=0) -> np.ndarray:
    """A movie spanning much of the dtype's range, so that conversions are checked, not just small values."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 1e3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def digest(path) -> str:
    """sha256 of a file, or of every file under a folder."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        with open(p, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def check_chunks(src: io.MovieSource, expected: np.ndarray, chunk: int) -> None:
    """iter_chunks covers every frame exactly once, in order, and agrees with read()."""
    starts, parts = zip(*src.iter_chunks(chunk))
    T = expected.shape[0]
    assert list(starts) == list(range(0, T, chunk))
    assert [len(p) for p in parts] == [min(chunk, T - s) for s in starts]
    assert all(p.dtype == np.float32 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), expected)


# ------------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format_and_dtype(tmp_path, fmt, dtype):
    movie = make_movie(dtype)
    written = io.save_movie(tmp_path / fmt, movie)
    src = io.open_movie(written if fmt.endswith(".h5") else tmp_path / fmt)
    assert src.shape == movie.shape and len(src) == movie.shape[0]
    assert src.dtype == np.dtype(dtype)
    expected = movie.astype(np.float32)
    whole = src.read()
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(src.read(3, 7), expected[3:7])
    np.testing.assert_array_equal(src.read(8), expected[8:])
    np.testing.assert_array_equal(io.load_movie(written), expected)
    for chunk in (1, 3, 4, 10, 25):
        check_chunks(src, expected, chunk)
    if fmt.endswith((".npy", ".tif")):
        assert src.memmapped


@pytest.mark.parametrize("dtype", DTYPES)
def test_compressed_tiff_reads_pages(tmp_path, dtype):
    movie = make_movie(dtype, shape=(9, 6, 8))
    tifffile.imwrite(tmp_path / "z.tif", movie, compression="zlib")
    src = io.open_movie(tmp_path / "z.tif")
    assert not src.memmapped and src.dtype == np.dtype(dtype)
    check_chunks(src, movie.astype(np.float32), 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_array_source(dtype):
    movie = make_movie(dtype)
    src = io.open_movie(movie)
    assert src.path is None and src.dtype == np.dtype(dtype)
    check_chunks(src, movie.astype(np.float32), 3)
    chunk = src.read(0, 2)
    chunk[:] = 0  # reads are copies: the caller's array is never changed
    np.testing.assert_array_equal(src.read(0, 2), movie[:2].astype(np.float32))
    assert io.open_movie(src) is not src and io.open_movie(src).shape == src.shape


@pytest.mark.parametrize("padded", [True, False])
def test_tiff_folder(tmp_path, padded):
    movie = make_movie(np.uint16, shape=(12, 6, 5))
    images = tmp_path / "neurofinder.00.00" / "images"
    images.mkdir(parents=True)
    for t, frame in enumerate(movie):  # unpadded names check natural order: image2 before image10
        tifffile.imwrite(images / (f"image{t:05d}.tiff" if padded else f"image{t}.tif"), frame)
    (images / "notes.txt").write_text("not a frame")
    for path in (images, images.parent):
        src = io.open_movie(path)
        assert src.shape == movie.shape and src.dtype == np.uint16
        check_chunks(src, movie.astype(np.float32), 5)


def test_tiff_folder_bad_frame(tmp_path):
    for t in range(3):
        tifffile.imwrite(tmp_path / f"image{t:05d}.tiff", np.ones((4, 4) if t != 1 else (5, 4), np.uint16))
    src = io.open_movie(tmp_path)
    with pytest.raises(MovieError, match=r"frame 1 .*image00001\.tiff.*shape"):
        src.read()


def test_empty_folder(tmp_path):
    with pytest.raises(MovieError, match="no .tif/.tiff files"):
        io.open_movie(tmp_path)


def test_bigtiff(tmp_path):
    movie = make_movie(np.int16, shape=(6, 9, 7))
    tifffile.imwrite(tmp_path / "big.tif", movie, bigtiff=True)
    tifffile.imwrite(tmp_path / "bigz.tif", movie, bigtiff=True, compression="zlib")
    io.save_movie(tmp_path / "ours.tif", movie, bigtiff=True)
    for name in ("big.tif", "bigz.tif", "ours.tif"):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_bigtiff
        src = io.open_movie(tmp_path / name)
        assert src.memmapped == (name != "bigz.tif")
        check_chunks(src, movie.astype(np.float32), 4)


def test_bigtiff_chosen_by_size(tmp_path, monkeypatch):
    movie = make_movie(np.uint8, shape=(4, 8, 8))  # 256 bytes
    monkeypatch.setattr(io, "_BIGTIFF_BYTES", 255)
    io.save_movie(tmp_path / "over.tif", movie)
    monkeypatch.setattr(io, "_BIGTIFF_BYTES", 256)
    io.save_movie(tmp_path / "under.tif", movie)
    for name, big in (("over.tif", True), ("under.tif", False)):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_bigtiff == big
        np.testing.assert_array_equal(io.load_movie(tmp_path / name), movie.astype(np.float32))


def test_save_movie_streams_a_movie_source(tmp_path):
    movie = make_movie(np.uint16, shape=(11, 5, 6))
    tifffile.imwrite(tmp_path / "z.tif", movie, compression="zlib")
    src = io.open_movie(tmp_path / "z.tif")
    for target in ("copy.tif", "copy.npy", "copy.h5:/m"):
        written = io.save_movie(tmp_path / target, src)
        back = io.open_movie(written)
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back.read(), movie.astype(np.float32))


def test_save_movie_keeps_other_h5_datasets(tmp_path):
    a, b = make_movie(np.int16), make_movie(np.float32, seed=1)
    io.save_movie(f"{tmp_path / 'both.h5'}:/a", a)
    io.save_movie(f"{tmp_path / 'both.h5'}:/b", b)
    np.testing.assert_array_equal(io.load_movie(f"{tmp_path / 'both.h5'}:/a"), a.astype(np.float32))
    np.testing.assert_array_equal(io.load_movie(f"{tmp_path / 'both.h5'}:/b"), b)
    with pytest.raises(MovieError, match="2 3-D datasets"):
        io.open_movie(tmp_path / "both.h5")


def test_source_survives_pickling(tmp_path):
    movie = make_movie(np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", movie, compression="zlib")
    io.save_movie(tmp_path / "m.h5", movie)
    for path in (tmp_path / "z.tif", tmp_path / "m.h5"):
        src = io.open_movie(path)
        src.read(0, 1)
        clone = pickle.loads(pickle.dumps(src))
        np.testing.assert_array_equal(clone.read(2, 5), movie[2:5].astype(np.float32))
        src.close()
        np.testing.assert_array_equal(src.read(2, 5), movie[2:5].astype(np.float32))  # reopens after close


def test_input_files_unchanged(tmp_path):
    movie = make_movie(np.float32)
    movie[4, 1, 1] = np.nan
    tifffile.imwrite(tmp_path / "z.tif", movie, compression="zlib")
    paths = [io.save_movie(tmp_path / name, movie) for name in ("m.tif", "m.npy", "m.h5:/x")]
    (tmp_path / "folder").mkdir()
    for t, frame in enumerate(movie):
        tifffile.imwrite(tmp_path / "folder" / f"image{t:05d}.tiff", frame)
    for path in [str(tmp_path / "z.tif"), *paths, str(tmp_path / "folder")]:
        on_disk = path.rsplit(":", 1)[0] if path.endswith(":/x") else path
        before = digest(on_disk)
        src = io.open_movie(path, nonfinite="repair")
        repaired = src.read()
        assert np.isfinite(repaired).all()
        list(src.iter_chunks(3))
        src.close()
        assert digest(on_disk) == before, path


# -------------------------------------------------------------------------------------------------- lazy reading


def test_memory_mapping_reads_only_the_chunk(tmp_path):
    movie = np.arange(200 * 128 * 128, dtype=np.uint16).reshape(200, 128, 128)  # 6.5 MB on disk, 13 MB as float32
    np.save(tmp_path / "m.npy", movie)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    tifffile.imwrite(tmp_path / "z.tif", movie, compression="zlib")
    chunk_bytes = 4 * 128 * 128 * 4
    for name in ("m.npy", "m.tif", "z.tif"):
        tracemalloc.start()
        src = io.open_movie(tmp_path / name)
        chunk = src.read(100, 104)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert src.memmapped == (name != "z.tif")
        if src.memmapped:
            assert isinstance(src._reader.array, np.memmap)
        np.testing.assert_array_equal(chunk, movie[100:104].astype(np.float32))
        assert peak < 4 * chunk_bytes + 2**20, (name, peak)  # the whole movie would be 13 MB


def test_default_chunk_length():
    src = io.open_movie(np.zeros((3, 512, 512), np.uint8))
    assert src.chunk_frames == io.DEFAULT_CHUNK_BYTES // (4 * 512 * 512)
    with pytest.raises(ParameterError, match="chunk_frames"):
        next(src.iter_chunks(0))


# --------------------------------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(MovieError, match=r"nothere\.tif' does not exist"):
        io.open_movie(tmp_path / "nothere.tif")
    with pytest.raises(MovieError, match="does not exist"):
        io.open_movie(f"{tmp_path / 'nothere.h5'}:/mov")


def test_unknown_extension(tmp_path):
    (tmp_path / "movie.avi").write_bytes(b"RIFF....")
    with pytest.raises(MovieError, match=r"movie\.avi.*unsupported extension '\.avi'.*\.tif.*\.npy.*h5") as err:
        io.open_movie(tmp_path / "movie.avi")
    assert isinstance(err.value, ValueError) and isinstance(err.value, JaxcnmfError)
    with pytest.raises(MovieError, match="unsupported extension"):
        io.save_movie(tmp_path / "out.avi", make_movie(np.uint8))


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 6, 5), (4,)])
def test_wrong_number_of_dimensions(tmp_path, shape):
    array = np.zeros(shape, np.float32)
    np.save(tmp_path / "m.npy", array)
    io.save_movie(tmp_path / "m.h5", np.zeros((2, 6, 5), np.float32))
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f["bad"] = array
    for source in (tmp_path / "m.npy", f"{tmp_path / 'm.h5'}:/bad", array):
        with pytest.raises(MovieError, match=re.escape(f"shape {tuple(shape)}") + r".*3: \(frames, height, width\)"):
            io.open_movie(source)


def test_colour_and_multichannel_tiffs(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 6, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(MovieError, match="colour"):
        io.open_movie(tmp_path / "rgb.tif")
    tifffile.imwrite(tmp_path / "tc.tif", np.zeros((4, 2, 6, 5), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(MovieError, match="dimensions"):
        io.open_movie(tmp_path / "tc.tif")


def test_too_few_frames(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((3, 4, 4), np.uint16))
    with pytest.raises(MovieError, match=r"short\.npy' has 3 frame.*at least 10.*min_frames=10"):
        io.open_movie(tmp_path / "short.npy", min_frames=10)
    assert len(io.open_movie(tmp_path / "short.npy", min_frames=3)) == 3
    with pytest.raises(ParameterError, match="min_frames"):
        io.open_movie(tmp_path / "short.npy", min_frames=0)
    with pytest.raises(ParameterError, match="nonfinite"):
        io.open_movie(tmp_path / "short.npy", nonfinite="ignore")


@pytest.mark.parametrize(
    "array", [np.zeros((2, 3, 3), np.complex64), np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), object)]
)
def test_unsupported_dtype(tmp_path, array):
    with pytest.raises(MovieError, match="dtype"):
        io.open_movie(array)
    np.save(tmp_path / "m.npy", array, allow_pickle=True)
    with pytest.raises(MovieError, match=r"m\.npy"):
        io.open_movie(tmp_path / "m.npy")


def test_nonfinite_frames_named(tmp_path):
    movie = make_movie(np.float32, shape=(30, 6, 6))
    movie[4, 2, 3] = np.nan
    movie[17, 0, 0] = np.inf
    movie[29, 5, 5] = -np.inf
    np.save(tmp_path / "m.npy", movie)
    with pytest.raises(MovieError, match=r"m\.npy' has NaN/Inf values in 3 of 30 frames \(frames 4, 17, 29\).*repair"):
        io.open_movie(tmp_path / "m.npy")
    with pytest.raises(MovieError, match="--repair-nonfinite"):
        io.open_movie(tmp_path / "m.npy")
    src = io.open_movie(tmp_path / "m.npy", check=False)  # no scan: the first read that meets one raises
    np.testing.assert_array_equal(src.read(0, 4), movie[:4])
    with pytest.raises(MovieError, match=r"frames 17 "):
        src.read(10, 20)
    assert list(io.open_movie(tmp_path / "m.npy", nonfinite="repair").nonfinite_frames) == [4, 17, 29]
    big = np.full((2, 3, 3), 1e300)  # beyond float32: infinite once converted
    with pytest.raises(MovieError, match="frames 0, 1"):
        io.open_movie(big)


def test_scan_records_frame_ranges_and_flags_exactly_the_nonfinite_frames(tmp_path):
    """The scan (per-frame min and max, chunk by chunk) flags the same frames as a per-pixel isfinite check of the
    float32 frames, NaN, +-inf and float64 values beyond float32 alike, and records each frame's float32 range;
    `fit` takes its checks from those ranges."""
    rng = np.random.default_rng(3)
    movie = rng.standard_normal((23, 5, 7)) * 10
    movie[2, 1, 1] = np.nan
    movie[9, 4, 6] = -np.inf
    movie[15, 0, 3] = 1e39  # finite in float64, infinite in float32
    movie[21, 3, 2] = 3e38  # still finite in float32
    np.save(tmp_path / "m.npy", movie)
    with np.errstate(over="ignore"):  # 1e39 overflows to inf on purpose
        as32 = movie.astype(np.float32)
    expected = np.flatnonzero(~np.isfinite(as32).all(axis=(1, 2)))
    for chunk in (1, 4, 23):
        src = io.open_movie(tmp_path / "m.npy", nonfinite="repair", check=False)
        np.testing.assert_array_equal(src.scan_nonfinite(chunk), expected)
        lo, hi = src.frame_range
        ok = np.isfinite(as32).all(axis=(1, 2))
        np.testing.assert_array_equal(lo[ok], as32[ok].min(axis=(1, 2)))
        np.testing.assert_array_equal(hi[ok], as32[ok].max(axis=(1, 2)))
    clean = io.open_movie(as32[ok])
    assert len(clean.nonfinite_frames) == 0 and clean.frame_range[1].max() == np.float32(3e38)
    assert io.open_movie(clean).frame_range is clean.frame_range  # carried over when re-opened
    assert io.open_movie(np.zeros((4, 3, 3), np.uint16)).frame_range is None  # integers: nothing to scan


def repair_reference(movie: np.ndarray) -> np.ndarray:
    """Per pixel, slow: np.interp over the finite samples (linear between, constant beyond the ends), 0 if none."""
    out = movie.astype(np.float64).copy()
    t = np.arange(movie.shape[0])
    for i in range(movie.shape[1]):
        for j in range(movie.shape[2]):
            ok = np.isfinite(movie[:, i, j])
            out[:, i, j] = np.interp(t, t[ok], movie[ok, i, j]) if ok.any() else 0.0
    return out


def test_interpolate_nonfinite_against_reference():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((40, 25))
    values[rng.random(values.shape) < 0.4] = np.nan
    values[:, 0] = np.nan
    values[5:, 1] = np.inf
    times = np.broadcast_to(np.arange(40.0)[:, None], values.shape)
    got = io._interpolate_nonfinite(values, times)
    want = repair_reference(values[:, :, None])[:, :, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_repair_across_chunks(tmp_path):
    rng = np.random.default_rng(1)
    movie = rng.standard_normal((23, 4, 5)).astype(np.float32)
    movie[0:3, 0, 0] = np.nan  # a run at the start: takes the first finite value
    movie[20:, 1, 1] = np.nan  # a run at the end: takes the last finite value
    movie[5:16, 2, 2] = np.inf  # a run spanning several chunks: interpolated from frames 4 and 16
    movie[:, 3, 3] = np.nan  # never finite: 0
    movie[11, :, :] = np.nan  # a whole bad frame
    movie[rng.random(movie.shape) < 0.05] = np.nan
    np.save(tmp_path / "m.npy", movie)
    want = repair_reference(movie)
    src = io.open_movie(tmp_path / "m.npy", nonfinite="repair")
    np.testing.assert_allclose(src.read(), want, rtol=1e-6, atol=1e-6)
    for chunk in (1, 2, 5, 7):
        parts = [c for _, c in src.iter_chunks(chunk)]
        np.testing.assert_allclose(np.concatenate(parts), want, rtol=1e-6, atol=1e-6)
    read = lambda a, b: movie[a:b].astype(np.float32)  # noqa: E731
    # a context step of one frame makes the search for finite neighbours walk many blocks outward
    parts = [io._repair_block(movie[s : s + 3].copy(), s, read, 23, 1) for s in range(0, 23, 3)]
    np.testing.assert_allclose(np.concatenate(parts), want, rtol=1e-6, atol=1e-6)


def test_truncated_tiff(tmp_path):
    movie = make_movie(np.uint16, shape=(8, 16, 16))
    for name, kw in (("plain.tif", {}), ("zlib.tif", {"compression": "zlib"}), ("big.tif", {"bigtiff": True})):
        tifffile.imwrite(tmp_path / name, movie, **kw)
        data = (tmp_path / name).read_bytes()
        for keep in (len(data) // 2, len(data) - 200, 7):  # mid-data, in the last page's header, in the file header
            (tmp_path / f"cut_{name}").write_bytes(data[:keep])
            with pytest.raises(MovieError, match=rf"cut_{name}.*(truncated|corrupt)"):
                io.open_movie(tmp_path / f"cut_{name}").read()


def test_corrupt_tiff(tmp_path):
    movie = make_movie(np.uint16, shape=(5, 32, 32))
    tifffile.imwrite(tmp_path / "z.tif", movie, compression="zlib")
    data = bytearray((tmp_path / "z.tif").read_bytes())
    garbage = bytearray(data)
    garbage[:8] = b"JUNKJUNK"  # not a TIFF header
    (tmp_path / "header.tif").write_bytes(garbage)
    with pytest.raises(MovieError, match=r"header\.tif.*could not be opened.*corrupt"):
        io.open_movie(tmp_path / "header.tif")
    with tifffile.TiffFile(tmp_path / "z.tif") as tif:
        offset, count = tif.pages[2].dataoffsets[0], tif.pages[2].databytecounts[0]
    scrambled = bytearray(data)
    scrambled[offset : offset + count] = bytes(count)  # zeros are not a valid zlib stream
    (tmp_path / "data.tif").write_bytes(scrambled)
    src = io.open_movie(tmp_path / "data.tif")  # only the first and last frame are decoded at open
    np.testing.assert_array_equal(src.read(0, 2), movie[:2].astype(np.float32))
    with pytest.raises(MovieError, match=r"data\.tif' could not be decoded at frames 2\.\.2.*corrupt"):
        src.read(2, 3)
    (tmp_path / "notiff.tif").write_bytes(b"")
    with pytest.raises(MovieError, match=r"notiff\.tif"):
        io.open_movie(tmp_path / "notiff.tif")


def test_corrupt_npy_and_h5(tmp_path):
    (tmp_path / "m.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MovieError, match=r"m\.npy' could not be opened"):
        io.open_movie(tmp_path / "m.npy")
    np.save(tmp_path / "cut.npy", np.zeros((10, 8, 8), np.float32))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(MovieError, match=r"cut\.npy"):
        io.open_movie(tmp_path / "cut.npy")
    (tmp_path / "m.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(MovieError, match=r"m\.h5' could not be opened"):
        io.open_movie(f"{tmp_path / 'm.h5'}:/mov")


def test_hdf5_paths(tmp_path):
    file = tmp_path / "rec.h5"
    with h5py.File(file, "w") as f:
        f["meta/image"] = np.zeros((4, 4))
        f.create_group("empty")
    with pytest.raises(MovieError, match=r"rec\.h5' has no 3-D dataset.*file\.h5:/dataset.*/meta/image \(4, 4\)"):
        io.open_movie(file)
    with pytest.raises(MovieError, match=r"rec\.h5:' names no dataset"):
        io.open_movie(f"{file}:")
    with pytest.raises(MovieError, match=r"names no dataset"):
        io.open_movie(f"{file}:/")
    with pytest.raises(MovieError, match=r"'/mov' does not exist.*/meta/image"):
        io.open_movie(f"{file}:/mov")
    with pytest.raises(MovieError, match=r"'/empty' is a group"):
        io.open_movie(f"{file}:/empty")
    with h5py.File(tmp_path / "nothing.h5", "w"):
        pass
    with pytest.raises(MovieError, match=r"nothing\.h5' has no 3-D dataset.*none"):
        io.open_movie(tmp_path / "nothing.h5")
    with pytest.raises(MovieError, match="names no dataset"):
        io.save_movie(f"{file}:", np.zeros((2, 3, 3)))


def test_missing_h5py_is_explained(tmp_path, monkeypatch):
    io.save_movie(tmp_path / "m.h5", np.zeros((2, 3, 3), np.float32))
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    with pytest.raises(MovieError, match=r"pip install jaxcnmf\[hdf5\]"):
        io.open_movie(tmp_path / "m.h5")
    with pytest.raises(ResultFileError, match=r"pip install jaxcnmf\[hdf5\]"):
        io.save_result(tmp_path / "r.h5", make_result())


# --------------------------------------------------------------------------------------------------- result files


def make_result(K=3, T=20, H=6, W=5, nb=2, p=2, optional=True) -> Result:
    rng = np.random.default_rng(0)
    arrays = dict(
        A=rng.random((K, H, W)).astype(np.float32),
        C=rng.standard_normal((K, T)).astype(np.float32),
        S=rng.random((K, T)).astype(np.float32),
        b=rng.random((nb, H, W)).astype(np.float32),
        f=rng.random((nb, T)).astype(np.float32),
        sn=rng.random((H, W)).astype(np.float32),
        g=rng.random((K, p)).astype(np.float64),
        YrA=rng.standard_normal((K, T)).astype(np.float32),
    )
    if optional:
        arrays.update(
            baseline=rng.random(K).astype(np.float32),
            lam=rng.random(K),
            accepted=np.array([True, False, True][:K]),
            centers=rng.random((K, 2)),
        )
    params = {"K": K, "gSig": [4, 4], "fps": 30.0, "name": "run ü", "nested": {"p": p, "merge_thr": 0.8}, "none": None}
    return Result.from_arrays(arrays, params=params, version="9.9.9")


@pytest.mark.parametrize("ext", [".h5", ".npz", ".hdf5"])
@pytest.mark.parametrize("optional", [True, False])
def test_result_round_trip(tmp_path, ext, optional):
    result = make_result(optional=optional)
    written = io.save_result(tmp_path / f"fit{ext}", result)
    back = io.load_result(written)
    assert isinstance(back, Result)
    want, got = result.arrays(), back.arrays()
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name])
    assert back.params == result.params and back.version == "9.9.9"


def test_result_round_trip_no_components(tmp_path):
    result = make_result(K=0, optional=False)
    for ext in (".h5", ".npz"):
        back = io.load_result(io.save_result(tmp_path / f"empty{ext}", result))
        assert back.A.shape == (0, 6, 5) and back.C.shape == (0, 20)


def test_result_layout_readable_without_jaxcnmf(tmp_path):
    result = make_result()
    io.save_result(tmp_path / "fit.h5", result)
    io.save_result(tmp_path / "fit.npz", result)
    with h5py.File(tmp_path / "fit.h5", "r") as f:
        assert f["A"].shape == (3, 6, 5) and f["C"].shape == (3, 20)
        assert f.attrs["jaxcnmf_version"] == "9.9.9" and '"merge_thr": 0.8' in f.attrs["params"]
    z = np.load(tmp_path / "fit.npz", allow_pickle=False)
    assert z["A"].shape == (3, 6, 5) and z["params"].ndim == 0 and str(z["jaxcnmf_version"]) == "9.9.9"


def test_result_file_errors(tmp_path):
    arrays = make_result().arrays()
    del arrays["YrA"], arrays["sn"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ResultFileError, match=r"partial\.npz' lacks the arrays \['sn', 'YrA'\]"):
        io.load_result(tmp_path / "partial.npz")
    arrays = make_result().arrays()
    arrays["C"] = arrays["C"][:2]
    np.savez(tmp_path / "mixed.npz", **arrays)
    with pytest.raises(ResultFileError, match=r"'C' has K=2 but 'A' has K=3"):
        io.load_result(tmp_path / "mixed.npz")
    with pytest.raises(ResultFileError, match="does not exist"):
        io.load_result(tmp_path / "none.h5")
    (tmp_path / "bad.h5").write_bytes(b"garbage")
    with pytest.raises(ResultFileError, match=r"bad\.h5' could not be read"):
        io.load_result(tmp_path / "bad.h5")
    with pytest.raises(ResultFileError, match=r"\.npz"):
        io.save_result(tmp_path / "fit.mat", make_result())
    odd = Result.from_arrays(make_result().arrays(), params={"x": object()})
    with pytest.raises(ResultFileError, match="JSON"):
        io.save_result(tmp_path / "odd.npz", odd)
    assert not (tmp_path / "odd.npz").exists()


# -------------------------------------------------------------------------------------------------- atomic writes


def write_then_fail(exc):
    """A stand-in writer that writes part of its file, then fails with `exc`."""

    def writer(file, *args, **kwargs):
        with open(file if str(file).endswith(".npz") else f"{file}.npz", "wb") as fh:
            fh.write(b"PK half a zip")
        raise exc

    return writer


def folder_listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_npz_write(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(np, "savez_compressed", write_then_fail(exc))
    with pytest.raises(type(exc)):
        io.save_result(tmp_path / "new.npz", make_result())
    assert folder_listing(tmp_path) == []
    monkeypatch.undo()
    io.save_result(tmp_path / "old.npz", make_result())
    before = digest(tmp_path / "old.npz")
    monkeypatch.setattr(np, "savez_compressed", write_then_fail(exc))
    with pytest.raises(type(exc)):
        io.save_result(tmp_path / "old.npz", make_result(K=2, optional=False))
    assert folder_listing(tmp_path) == ["old.npz"] and digest(tmp_path / "old.npz") == before


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_h5_write(tmp_path, monkeypatch, exc):
    io.save_result(tmp_path / "old.h5", make_result())
    before = digest(tmp_path / "old.h5")
    real = h5py.Group.create_dataset
    calls = []

    def create_then_fail(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:  # two datasets are already written
            raise exc
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_then_fail)
    for name in ("new.h5", "old.h5"):
        calls.clear()
        with pytest.raises(type(exc)):
            io.save_result(tmp_path / name, make_result(K=2))
        assert len(calls) == 3
    assert folder_listing(tmp_path) == ["old.h5"] and digest(tmp_path / "old.h5") == before


class DyingReader:
    """A reader whose frames past the fifth cannot be read, like a source that dies (or is interrupted) mid-write."""

    path, memmapped = None, False

    def __init__(self, movie):
        self.movie, self.shape, self.dtype = movie, movie.shape, movie.dtype

    def read_raw(self, start, stop):
        if stop > 5:
            raise KeyboardInterrupt
        return self.movie[start:stop]

    def close(self):
        pass


class TwoFrameChunks(io.MovieSource):
    chunk_frames = 2  # so the writer has written some frames when the reader dies


@pytest.mark.parametrize("target", ["m.tif", "m.npy", "m.h5:/movie"])
def test_interrupted_movie_write(tmp_path, target):
    movie = make_movie(np.uint16)
    file = tmp_path / target.split(":")[0]
    with pytest.raises(KeyboardInterrupt):
        io.save_movie(tmp_path / target, TwoFrameChunks(DyingReader(movie)))
    assert folder_listing(tmp_path) == []
    io.save_movie(tmp_path / target, movie)
    before = digest(file)
    with pytest.raises(KeyboardInterrupt):
        io.save_movie(tmp_path / target, TwoFrameChunks(DyingReader(movie)))
    assert folder_listing(tmp_path) == [file.name] and digest(file) == before


def test_atomic_output_directly(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with io.atomic_output(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".bin") and not os.path.exists(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"complete")
    assert target.read_bytes() == b"complete"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_output(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"complete" and folder_listing(target.parent) == ["out.bin"]
    with pytest.raises(ParameterError, match="folder"):
        with io.atomic_output(tmp_path):
            pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ParameterError, match="cannot create the output folder"):
        with io.atomic_output(tmp_path / "file" / "out.npz"):
            pass


# ------------------------------------------------------------------------------------------------------ real data


def test_neurofinder_movie_loads():
    path = shared_path("neurofinder_tr", "movie.tif")
    src = io.open_movie(path, min_frames=100)
    assert src.shape == (600, 256, 256) and src.dtype == np.uint16 and not src.memmapped
    chunk = src.read(250, 262)
    want = tifffile.imread(path, key=range(250, 262))
    assert chunk.dtype == np.float32
    np.testing.assert_array_equal(chunk, want.astype(np.float32))
    last = [c for s, c in src.iter_chunks(64) if s == 576][0]
    np.testing.assert_array_equal(last, tifffile.imread(path, key=range(576, 600)).astype(np.float32))


def test_allen_h5_loads():
    path = shared_path("allen", "792757260_test_data.h5")
    for source in (f"{path}:/input_frames", path):
        src = io.open_movie(source)
        assert src.shape == (100, 100, 100) and src.dtype == np.int16
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(src.read(40, 50), f["input_frames"][40:50].astype(np.float32))
