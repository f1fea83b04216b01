"""The fit driver end to end: accuracy on a small simulated movie with K not given, bad inputs caught before any heavy
work, determinism, path == array, and the `jaxcnmf fit` / `jaxcnmf demo` commands."""

from __future__ import annotations

import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.errors import MovieError, ParameterError
from jaxcnmf.fit import Params, fit


@pytest.fixture(scope="module")
def small():
    from jaxcnmf.sim import simulate

    return simulate(seed=1, shape=(40, 40), n_frames=400, n_neurons=5, peak_snr=5.0)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Make any stage after input checking fail loudly, to prove errors are raised before heavy work."""
    import jaxcnmf.fit as fit_mod

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was rejected")

    monkeypatch.setattr(fit_mod, "fit_array", boom)
    monkeypatch.setattr(fit_mod, "_fit_owned", boom)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(neuron_radius=0), "neuron_radius"),
        (dict(neuron_radius=-2.0), "neuron_radius"),
        (dict(neuron_radius=None), "neuron_radius"),
        (dict(neuron_radius=30.0), "does not fit"),
        (dict(neuron_radius=3.0, fps=0.0), "fps"),
        (dict(neuron_radius=3.0, fps=float("nan")), "fps"),
        (dict(neuron_radius=3.0, K=0), "K"),
        (dict(neuron_radius=3.0, p=3), "p="),
        (dict(neuron_radius=3.0, tsub=0), "tsub"),
        (dict(neuron_radius=3.0, tsub=2.5), "tsub"),
        (dict(neuron_radius=3.0, tsub=50), "tsub"),  # 100 frames: bins of 50 leave 2
        (dict(neuron_radius=3.0, footprint_median=2), "footprint_median"),
        (dict(neuron_radius=3.0, footprint_median=0), "footprint_median"),
        (dict(neuron_radius=3.0, temporal_groups="jacobi"), "temporal_groups"),
        (dict(neuron_radius=3.0, not_a_knob=1), "unknown fit parameter"),
    ],
)
def test_bad_parameters_are_clear_errors(kw, match, no_heavy_work):
    movie = np.random.default_rng(0).random((100, 40, 40)).astype(np.float32)
    with pytest.raises(ParameterError, match=match):
        fit(movie, **kw)


def test_short_and_nonfinite_movies_are_clear_errors(no_heavy_work):
    with pytest.raises(MovieError, match="too short"):
        fit(np.random.default_rng(0).random((15, 30, 30)).astype(np.float32), 3.0)
    movie = np.random.default_rng(0).random((100, 30, 30)).astype(np.float32)
    movie[7, 3, 4] = np.nan
    with pytest.raises(MovieError):
        fit(movie, 3.0)
    with pytest.raises(MovieError):
        fit("/nonexistent/movie.tif", 3.0)


def test_all_zero_movie_gives_zero_components():
    res = fit(np.zeros((60, 24, 24), np.float32), 3.0)
    assert res.n_components == 0
    assert res.A.shape == (0, 24, 24) and res.C.shape == (0, 60) and res.g.shape == (0, 2)
    assert res.b.shape == (1, 24, 24) and res.f.shape == (1, 60) and res.sn.shape == (24, 24)
    assert res.accepted.shape == (0,)


def test_constant_movies_give_zero_components_from_the_scans_ranges_or_the_repaired_frames(no_heavy_work):
    """A constant movie has no signal: zero components, whether the check reads the ranges `open_movie`'s scan
    recorded (a clean float movie, uint16 read as float32) or the frames after repair (a NaN pixel interpolated)."""
    for movie in (np.full((60, 24, 24), 5.0, np.float32), np.full((60, 24, 24), 7, np.uint16)):
        assert fit(movie, 3.0).n_components == 0
    movie = np.full((60, 24, 24), 5.0, np.float32)
    movie[10, 3, 3] = np.nan
    assert fit(movie, 3.0, nonfinite="repair").n_components == 0
    movie[10, 3, 3] = 6.0  # one pixel off: not constant, and the range check sees it
    with pytest.raises(AssertionError, match="heavy work started"):
        fit(movie, 3.0)


def test_params_are_frozen_documented_and_round_trip():
    prm = Params(neuron_radius=4.0)
    with pytest.raises(Exception):
        prm.p = 1  # frozen
    d = prm.to_dict()
    assert Params(**d) == prm
    for name in d:
        assert f"`{name}`" in Params.__doc__, name


def test_footprint_median_default_follows_the_init():
    """3 x 3 for somata; none for the shape-following inits (a median erases processes 1-2 pixels wide); an explicit
    value wins."""
    from jaxcnmf.fit import footprint_median

    assert footprint_median(Params(neuron_radius=4.0)) == 3
    assert footprint_median(Params(neuron_radius=1.5, init="dendrite")) == 1
    assert footprint_median(Params(neuron_radius=1.5, init="sparse_nmf")) == 1
    assert footprint_median(Params(neuron_radius=4.0, footprint_median=1)) == 1
    assert footprint_median(Params(neuron_radius=1.5, init="dendrite", footprint_median=5)) == 5


@pytest.mark.parametrize("groups", ["disjoint", "all"])
def test_accuracy_on_simulated_movie_with_k_not_given(groups):
    """64x64x1000, 12 neurons (some overlapping), AR(2), peak SNR 4, neuropil: the reduced version of issue 4's goal,
    with either order of the temporal update."""
    from jaxcnmf.metrics import score_result
    from jaxcnmf.sim import simulate

    movie, truth = simulate(seed=0, shape=(64, 64), n_frames=1000, n_neurons=12, overlap=0.2, peak_snr=4.0,
                            tau_rise=0.05, neuropil=0.3)
    assert truth.g.shape[1] == 2
    res = fit(movie, float(truth.params["radius"]), fps=truth.fps, temporal_groups=groups)
    s = score_result(res, truth=truth, fps=truth.fps)
    print({k: s[k] for k in ("n_true", "n_est", "precision", "recall", "f1", "calcium_corr_median",
                             "spike_corr_median")})
    assert s["f1"] >= 0.9
    assert s["calcium_corr_median"] >= 0.9
    assert s["spike_corr_median"] >= 0.7
    # structure of the result
    K = res.n_components
    assert res.A.shape == (K, 64, 64) and res.C.shape == (K, 1000) and res.S.shape == (K, 1000)
    assert np.allclose(np.linalg.norm(np.asarray(res.A).reshape(K, -1), axis=1), 1.0, atol=1e-4)
    acc = np.asarray(res.accepted)
    assert not np.any(np.diff(acc.astype(int)) > 0)  # accepted components first
    S = np.asarray(res.S)
    assert S.min() >= -1e-4 * S.max() and np.isfinite(np.asarray(res.C)).all()  # spikes >= 0 up to float32 rounding
    assert res.params["neuron_radius"] == float(truth.params["radius"]) and res.version == jaxcnmf.__version__


def _same(r1, r2):
    a1, a2 = r1.arrays(), r2.arrays()
    assert a1.keys() == a2.keys()
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)


def test_deterministic_path_equals_array_and_cli_round_trip(small, tmp_path):
    from jaxcnmf.cli import main
    from jaxcnmf.io import load_result, save_movie

    movie, truth = small
    before = movie.copy()
    r1 = fit(movie, float(truth.params["radius"]), fps=truth.fps)
    assert r1.n_components >= 1
    np.testing.assert_array_equal(movie, before)  # the fit reads the caller's float32 array in place, never writes it

    path = str(tmp_path / "movie.tif")
    save_movie(path, movie)
    assert main(["fit", path, "--neuron-radius", str(float(truth.params["radius"])), "--fps", str(truth.fps),
                 "--quiet"]) == 0
    out = tmp_path / "movie_cnmf.h5"
    assert out.exists()
    _same(load_result(str(out)), r1)  # a second, independent fit from the file: deterministic and path == array
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movie.tif", "movie_cnmf.h5"]


def test_pixels_by_frames_is_the_exact_transpose_without_a_copy():
    """The (d, T) movie the fit works on is built by pixel blocks in a 64-byte aligned buffer (so the CPU backend uses
    it in place): it must be exactly Y reshaped to (T, H*W) and transposed, whatever the block size."""
    import jax

    from jaxcnmf.fit import _pixels_by_frames

    big = np.random.default_rng(0).standard_normal((37, 9, 11)).astype(np.float32)
    for Y in (big[:, :5, :7].copy(), big[:, 2:7, 3:10]):  # contiguous, and a strided view (a patch of a movie)
        for block in (37 * 7 * 2, 37 * 35, 10**6):  # 2 rows per block (the last one short), one block, one block
            Yr = _pixels_by_frames(Y, block=block)
            assert isinstance(Yr, jax.Array) and Yr.dtype == np.float32
            np.testing.assert_array_equal(np.asarray(Yr), np.ascontiguousarray(Y).reshape(37, 35).T)


def test_tiled_transpose_is_exact_with_ragged_tiles():
    from jaxcnmf.fit import _transpose_into

    src = np.random.default_rng(1).standard_normal((37, 35)).astype(np.float32)
    for tile in (1, 4, 8, 64):  # many tiles with short last ones, and one tile larger than the array
        dst = np.full((35, 37), np.nan, np.float32)
        _transpose_into(dst, src, tile=tile)
        np.testing.assert_array_equal(dst, src.T)


def test_dropping_a_mixture_refits_only_its_neighbours_and_equals_a_full_refit():
    """The final check drops mixtures and refits the traces of the components overlapping them only. Components that
    overlap no dropped one see the same raw traces, so a full refit (same g, f fixed) would give them their old
    values: the local refit must equal the full one everywhere and leave the others' fields exactly as they were."""
    from jaxcnmf.fit import _drop_and_refit_neighbours
    from jaxcnmf.temporal import update_temporal

    rng = np.random.default_rng(3)
    H = W = 32
    T = 500
    yy, xx = np.mgrid[:H, :W]
    centres = [(8, 8), (8, 13), (8, 24), (22, 6), (24, 18), (23, 27), (8, 10)]  # 0, 1 overlap; 6 lies across both
    A = np.stack([np.where((a := np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 8.0)) > 0.05, a, 0.0).ravel()
                  for r, c in centres], axis=1)
    A /= np.linalg.norm(A, axis=0)
    d_, r_ = np.exp(-1 / 20.0), np.exp(-1 / 2.0)
    g = np.array([d_ + r_, -d_ * r_])
    from scipy.signal import lfilter

    S = (rng.random((6, T)) < 0.03) * 3.0
    C = lfilter([1.0], np.r_[1.0, -g], S, axis=1)
    C = np.vstack([C, 0.5 * (C[0] + C[1])])  # the mixture's trace: half of each neighbour's
    b = np.ones((H * W, 1))
    f = np.ones((1, T))
    Y = (A[:, :6] @ C[:6] + b @ f + 0.2 * rng.normal(size=(H * W, T))).astype(np.float32)
    A, C, b, f = (np.asarray(x, np.float32) for x in (A, C, b, f))
    prm = Params(neuron_radius=3.0)
    tr = update_temporal(Y, A, C, b, f, p=2)
    drop = np.zeros(7, bool)
    drop[6] = True
    A2, C2, tr2 = _drop_and_refit_neighbours(Y, A, np.asarray(tr.C), b, tr.f, tr, drop, prm)
    keep = np.arange(6)
    full = update_temporal(Y, A[:, keep], np.asarray(tr.C)[keep], b, tr.f, g=tr.g[keep], p=2, update_f=False)
    np.testing.assert_array_equal(np.asarray(A2), A[:, keep])
    for name in ("C", "S", "YrA", "baseline", "c1", "lam", "sn"):
        np.testing.assert_allclose(np.asarray(getattr(tr2, name)), np.asarray(getattr(full, name)), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(np.asarray(getattr(full, name))).max()), err_msg=name)
    np.testing.assert_array_equal(np.asarray(C2), np.asarray(tr2.C))
    untouched = np.arange(2, 6)
    for name in ("C", "S", "g", "baseline", "c1", "lam", "sn"):
        np.testing.assert_array_equal(np.asarray(getattr(tr2, name))[untouched],
                                      np.asarray(getattr(tr, name))[untouched], err_msg=name)
    # the neighbours did change: each takes back the half of its trace the mixture held
    assert not np.allclose(np.asarray(tr2.C)[:2], np.asarray(tr.C)[:2])


def test_cli_fit_reports_bad_input_in_one_line(tmp_path, capsys):
    from jaxcnmf.cli import main

    assert main(["fit", str(tmp_path / "missing.tif"), "--neuron-radius", "3"]) == 2
    err = capsys.readouterr().err
    assert "jaxcnmf fit: error:" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
    movie = tmp_path / "movie.npy"
    np.save(movie, np.ones((30, 16, 16), np.float32))
    assert main(["fit", str(movie), "--neuron-radius", "3", "--footprint-median", "2"]) == 2
    err = capsys.readouterr().err
    assert "footprint_median=2" in err and "odd" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movie.npy"]


@pytest.mark.slow
def test_demo_small_writes_everything(tmp_path):
    from jaxcnmf.cli import main

    assert main(["demo", "--small", "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"result.h5", "truth.npz", "scores.json"} <= names


@pytest.mark.slow
def test_real_movie_finds_more_labelled_cells():
    """neurofinder_tr (256x256x600, ~7 Hz, 54 anatomical labels, many silent), about 2 minutes on 2 cores.

    Before the greedy init fitted footprints on a disc around each seed, the fit returned 10 components (4 labelled
    cells: P 0.40, R 0.074). Then about 100 (11 labelled cells: P 0.11, R 0.20, with the default HALS spatial
    update); with the 3 x 3 median filter of the footprints (`Params.footprint_median`) 93 accepted of 100
    (12 labelled cells: P 0.13, R 0.22). Precision against these labels stays low: most unmatched components overlap
    no label at all (compact active blobs that the anatomical labels do not hold). The fast check of the init on
    this movie is in tests/test_init.py.
    """
    from tests.conftest import shared_path
    from jaxcnmf.io import load_movie
    from jaxcnmf.metrics import load_regions, match_footprints

    folder = shared_path("neurofinder_tr")
    movie = load_movie(folder / "movie.tif")
    regions = load_regions(folder / "regions.json", movie.shape[1:])
    res = fit(movie, 4.5, fps=7.0)
    acc = np.asarray(res.accepted, bool)
    m = match_footprints(np.asarray(res.A)[acc], regions)
    assert m.recall >= 0.2, (m.recall, m.precision, m.n_est)
    assert m.precision >= 0.115, (m.recall, m.precision, m.n_est)


def test_fit_turns_on_the_persistent_compilation_cache_once_and_respects_opt_outs(tmp_path, monkeypatch):
    import jax

    from jaxcnmf import _cache

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setattr(_cache, "_done", False)
        monkeypatch.setenv("JAXCNMF_CACHE_DIR", "")  # opted out: JAX is left without a cache
        assert _cache.enable_compilation_cache() is None and not jax.config.jax_compilation_cache_dir
        monkeypatch.setattr(_cache, "_done", False)
        monkeypatch.setenv("JAXCNMF_CACHE_DIR", str(tmp_path / "xla"))
        with pytest.raises(ParameterError):  # fit turns it on first, before its checks
            fit(np.zeros((30, 8, 8), np.float32), neuron_radius=-1)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        monkeypatch.setattr(_cache, "_done", False)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # the caller's own folder is kept
        assert _cache.enable_compilation_cache() == str(tmp_path / "mine")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_small_pages_turns_numpy_hugepage_advice_off_and_restores_it():
    """`fit` runs with numpy's huge-page advice off (`fit._small_pages`: a performance hint) and gives it back as it
    was, also when the fit raises."""
    from jaxcnmf.fit import _small_pages

    try:
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    if not hasattr(multiarray, "_get_madvise_hugepage"):
        pytest.skip("this numpy has no huge-page switch")
    before = multiarray._get_madvise_hugepage()
    for start in (True, False):
        multiarray._set_madvise_hugepage(start)
        with _small_pages():
            assert multiarray._get_madvise_hugepage() is False
        assert multiarray._get_madvise_hugepage() is start
        with pytest.raises(RuntimeError), _small_pages():
            raise RuntimeError("a failed fit")
        assert multiarray._get_madvise_hugepage() is start
    multiarray._set_madvise_hugepage(before)
