"""The simulator against its own promises: determinism, the model it claims (movie = shift(A C + b f) + noise with sd
sn), the requested peak SNR, the kinetics, the overlap knob, dendrite shapes, truth files and the CLI.

Every check measures the simulated data independently (float64 reconstructions, log-slope fits, scipy's shift) rather
than re-reading the numbers the simulator computed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from jaxcnmf.errors import ParameterError, ResultFileError
from jaxcnmf.sim import SimParams, load_truth, peak_snr, save_truth, simulate

SMALL = dict(shape=(40, 40), n_frames=200, n_neurons=6)


def reconstruct(truth) -> np.ndarray:
    """The noise-free movie A C + b f + offset in float64, written out here from the truth's arrays (no motion)."""
    return (np.einsum("khw,kt->thw", truth.A.astype(float), truth.C.astype(float))
            + np.einsum("khw,kt->thw", truth.b.astype(float), truth.f.astype(float)) + truth.offset)


def whole_cells(truth) -> np.ndarray:
    return truth.parent == np.arange(truth.parent.size)


# ---------------------------------------------------------------- determinism, shapes ---------------------------------


def test_same_seed_is_bit_identical_and_another_seed_differs():
    m1, t1 = simulate(seed=3, **SMALL)
    m2, t2 = simulate(seed=3, **SMALL)
    m3, t3 = simulate(seed=4, **SMALL)
    assert np.array_equal(m1, m2)
    for name, a in t1.arrays().items():
        assert np.array_equal(a, getattr(t2, name)), name
    assert t1.params == t2.params
    assert not np.array_equal(m1, m3)
    assert not np.array_equal(t1.A, t3.A)
    # a SimParams object gives the same as the same knobs passed as overrides
    m4, _ = simulate(SimParams(**SMALL), seed=3)
    assert np.array_equal(m1, m4)


def test_noise_level_does_not_change_cells_or_activity():
    """Each part draws from its own stream: another peak SNR rescales the same noise, cells and spikes unchanged."""
    m1, t1 = simulate(seed=1, peak_snr=3.0, **SMALL)
    m2, t2 = simulate(seed=1, peak_snr=6.0, **SMALL)
    assert np.array_equal(t1.A, t2.A) and np.array_equal(t1.C, t2.C) and np.array_equal(t1.f, t2.f)
    n1, n2 = m1 - t1.noise_free(), m2 - t2.noise_free()
    np.testing.assert_allclose(n1 * (t2.sn / t1.sn), n2, atol=1e-3 * float(t1.sn.max()))


@pytest.mark.parametrize("tau_rise, p", [(0.05, 2), (0.0, 1), (None, 1)])
def test_shapes_and_non_negativity(tau_rise, p):
    movie, t = simulate(seed=0, tau_rise=tau_rise, background_rank=2, neuropil=0.2, **SMALL)
    T, (H, W), K = 200, (40, 40), 6
    assert movie.shape == (T, H, W) and movie.dtype == np.float32
    assert t.A.shape == (K, H, W) and t.C.shape == (K, T) and t.S.shape == (K, T)
    assert t.b.shape == (3, H, W) and t.f.shape == (3, T)  # rank 2 + neuropil
    assert t.params["neuropil_index"] == 2
    assert t.sn.shape == (H, W) and t.g.shape == (K, p) and t.centers.shape == (K, 2) and t.shifts.shape == (T, 2)
    for name in ("A", "C", "S", "b", "f"):
        assert np.all(getattr(t, name) >= 0), name
    np.testing.assert_array_equal(t.A.reshape(K, -1).max(1), 1.0)  # unit maximum
    assert np.all(t.sn > 0) and np.all(np.isfinite(movie))
    assert np.all((t.centers >= 0) & (t.centers <= [H - 1, W - 1]))
    assert t.fps == 30.0 and t.shape == (T, H, W)


def test_invalid_knobs_raise_parameter_error_before_work():
    with pytest.raises(ParameterError, match="unknown knob"):
        simulate(n_nerons=3)
    with pytest.raises(ParameterError, match="overlap"):
        simulate(overlap=1.5)
    with pytest.raises(ParameterError, match="tau_rise"):
        simulate(tau_rise=1.0, tau_decay=0.5)
    with pytest.raises(ParameterError, match="noise"):
        simulate(noise="laplace")
    with pytest.raises(ParameterError, match="could not place"):
        simulate(shape=(32, 32), n_neurons=200, n_frames=10)
    with pytest.raises(ParameterError, match="no neuron fired"):
        simulate(spike_rate=0.0, **SMALL)


# ---------------------------------------------------------------- the model and the noise -----------------------------


@pytest.mark.parametrize("noise", ["gaussian", "poisson-gaussian"])
def test_movie_minus_noise_free_has_noise_sd_sn(noise):
    movie, t = simulate(seed=2, shape=(32, 32), n_frames=600, n_neurons=5, noise=noise, offset=20.0)
    clean = reconstruct(t)
    np.testing.assert_allclose(t.noise_free(), clean, rtol=1e-5, atol=1e-3)
    resid = movie - clean
    ratio = resid.var(0) / t.sn.astype(float) ** 2
    assert abs(ratio.mean() - 1) < 0.02  # 1024 pixels x 600 frames
    assert abs(np.median(np.sqrt(ratio)) - 1) < 0.03
    assert abs(resid.mean()) < 0.02 * t.sn.mean()
    # noise is spatially structured as documented: brighter pixels are noisier
    assert np.corrcoef(clean.mean(0).ravel(), t.sn.ravel() ** 2)[0, 1] > 0.99


@pytest.mark.parametrize("target, noise", [(3.0, "gaussian"), (10.0, "gaussian"), (5.0, "poisson-gaussian")])
def test_measured_peak_snr_is_the_request(target, noise):
    movie, t = simulate(seed=5, shape=(64, 64), n_frames=1000, n_neurons=15, peak_snr=target, noise=noise)
    K = t.A.shape[0]
    flat = t.A.reshape(K, -1)
    brightest = flat.argmax(1)
    resid = (movie - reconstruct(t)).reshape(movie.shape[0], -1)
    noise_sd = resid[:, brightest].std(0)
    peak = t.C.max(1) * flat[np.arange(K), brightest]
    fired = peak > 0
    measured = np.median(peak[fired] / noise_sd[fired])
    assert abs(measured / target - 1) < 0.10, measured
    assert abs(np.median(peak_snr(t)[fired]) / target - 1) < 1e-3  # the definition holds exactly on the truth


# ---------------------------------------------------------------- kinetics --------------------------------------------


def decay_tau(C: np.ndarray, S: np.ndarray, fps: float, skip: int) -> float:
    """tau (s) from the pooled log-slope of C over spike-free stretches, `skip` frames after each spike left out."""
    num = den = 0.0
    for c, s in zip(C.astype(float), S):
        bounds = np.r_[0, np.flatnonzero(s > 0), c.size]
        for a, b in zip(bounds[:-1], bounds[1:]):
            t = np.arange(a + skip, b)
            t = t[c[t] > 0] if t.size else t
            if t.size >= 10:
                y = np.log(c[t])
                num += np.sum((t - t.mean()) * (y - y.mean()))
                den += np.sum((t - t.mean()) ** 2)
    return -1.0 / (num / den * fps)


@pytest.mark.parametrize("tau_decay, tau_rise, fps", [(0.7, None, 30.0), (0.5, 0.05, 30.0), (1.2, 0.1, 15.0)])
def test_calcium_decays_with_the_requested_time_constant(tau_decay, tau_rise, fps):
    _, t = simulate(seed=7, shape=(48, 48), n_frames=2000, n_neurons=8, fps=fps, tau_decay=tau_decay,
                    tau_rise=tau_rise, spike_rate=0.3, burst_prob=0.0)
    skip = 1 if tau_rise is None else math.ceil(8 * tau_rise * fps)
    tau = decay_tau(t.C, t.S, fps, skip)
    assert abs(tau / tau_decay - 1) < 0.05, tau
    # S is the AR innovation of C with the recorded g
    g = t.g.astype(float)
    C = t.C.astype(float)
    s_hat = C[:, 2:] - sum(g[:, [j]] * C[:, 2 - j - 1 : C.shape[1] - j - 1] for j in range(g.shape[1]))
    np.testing.assert_allclose(s_hat, t.S[:, 2:], atol=2e-5 * C.max())
    if tau_rise is not None:
        # the rise: an isolated transient peaks where exp(-t/tau_d) - exp(-t/tau_r) does (t in frames, from the spike)
        k = np.arange(60) + 1
        expected = int(np.argmax(np.exp(-k / (tau_decay * fps)) - np.exp(-k / (tau_rise * fps))))
        offsets = []
        for c, s in zip(C, t.S):
            sp = np.flatnonzero(s > 0)
            for i, j in enumerate(sp):
                if (i == 0 or j - sp[i - 1] > 5 * tau_decay * fps) and (i + 1 == sp.size or sp[i + 1] - j > 30):
                    if j + 30 < c.size:
                        offsets.append(int(np.argmax(c[j : j + 30])))
        assert len(offsets) >= 5 and np.median(offsets) == expected


def test_ar_coefficients_follow_the_time_constants():
    """g per neuron is the documented conversion (and agrees with noise.tau_to_ar), also with per-neuron jitter."""
    import jax

    from jaxcnmf.noise import tau_to_ar

    _, t = simulate(seed=0, fps=20.0, tau_decay=0.8, tau_rise=0.1, **SMALL)
    d, r = math.exp(-1 / (0.8 * 20)), math.exp(-1 / (0.1 * 20))
    np.testing.assert_allclose(t.g, np.tile([d + r, -d * r], (6, 1)), rtol=1e-6)
    with jax.enable_x64(True):
        np.testing.assert_allclose(t.g[0], np.asarray(tau_to_ar(0.8, 0.1, 20.0)), rtol=1e-6)
    _, t = simulate(seed=0, tau_rise=None, tau_jitter=0.3, **SMALL)
    tau = -1 / (np.log(t.g[:, 0].astype(float)) * t.fps)
    assert t.g.shape == (6, 1) and np.std(tau) > 0.05 and np.all(np.abs(np.log(tau / 0.5)) < 1.5)


# ---------------------------------------------------------------- space: overlap, dendrites, motion -------------------


def overlapping_fraction(A: np.ndarray, level: float = 0.2) -> float:
    """Fraction of footprints whose support (above `level` of the maximum) shares a pixel with another's."""
    masks = (A > level).reshape(A.shape[0], -1).astype(np.int64)
    inter = masks @ masks.T
    np.fill_diagonal(inter, 0)
    return float((inter.max(1) > 0).mean())


def test_overlap_knob_increases_measured_overlap():
    measured = []
    for knob in (0.0, 0.3, 0.7, 1.0):
        _, t = simulate(seed=11, shape=(64, 64), n_neurons=16, n_frames=100, overlap=knob)
        measured.append(overlapping_fraction(t.A))
    assert measured[0] <= 0.15
    assert all(b > a for a, b in zip(measured, measured[1:])), measured


def test_dendrites_are_thin_elongated_branching_and_cross():
    _, t = simulate(seed=0, mode="dendrite", shape=(96, 96), n_neurons=12, overlap=0.3, n_frames=200)
    n = t.n_neurons
    assert n == 12 and t.A.shape[0] > n  # branch-local components follow the processes
    masks = t.A[:n] > 0.5
    half_width = [ndimage.distance_transform_edt(m).max() for m in masks]
    assert max(half_width) <= 2.5  # 1-2 px wide lines (a soma of radius 4 gives about 4)
    extent = np.array([max(np.ptp(np.nonzero(m)[0]), np.ptp(np.nonzero(m)[1])) + 1 for m in masks])
    area = masks.reshape(n, -1).sum(1)
    assert np.median(extent) >= 20 and np.median(area / extent**2) < 0.2  # a disc gives pi/4
    # crossings: two processes share a few pixels only
    inter = masks.reshape(n, -1).astype(np.int64) @ masks.reshape(n, -1).T.astype(np.int64)
    np.fill_diagonal(inter, 0)
    small = np.minimum(area[:, None], area[None, :])
    assert np.any((inter > 0) & (inter <= 0.25 * small))
    # each branch-local footprint lies on its process; its events are its own
    for k in range(n, t.A.shape[0]):
        assert np.all(t.A[t.parent[k]][t.A[k] > 0.05] > 0)
    assert any(not np.array_equal(t.S[k] > 0, t.S[t.parent[k]] > 0) for k in range(n, t.A.shape[0]))


def test_motion_shifts_the_noise_free_movie_rigidly():
    movie, t = simulate(seed=4, shape=(40, 40), n_frames=400, n_neurons=6, motion_px=0.8)
    assert abs(t.shifts.std() / 0.8 - 1) < 0.1 and abs(t.shifts.mean()) < 0.1
    clean = reconstruct(t)  # unshifted
    nf = t.noise_free()
    for i in (0, 17, 399):
        expected = ndimage.shift(clean[i], t.shifts[i].astype(float), order=1, mode="nearest")
        np.testing.assert_allclose(nf[i], expected, rtol=1e-5, atol=1e-3)
    ratio = (movie - nf).var(0) / t.sn.astype(float) ** 2
    assert abs(ratio.mean() - 1) < 0.03
    # the unshifted model does not fit where the image has edges
    edges = np.hypot(*np.gradient(clean.mean(0)))
    unshifted = (movie - clean).var(0) / t.sn.astype(float) ** 2
    assert unshifted[edges > np.percentile(edges, 90)].mean() > 1.2


def test_quantized_movie_is_uint16_ready():
    movie, t = simulate(seed=0, quantize=True, offset=50.0, shape=(32, 32), n_frames=300, n_neurons=4)
    assert np.array_equal(movie, np.rint(movie)) and movie.min() >= 0 and movie.max() <= 65535
    assert t.params["n_clipped"] == 0 and t.offset == 50.0
    ratio = (movie - reconstruct(t)).var(0) / t.sn.astype(float) ** 2
    assert abs(ratio.mean() - 1) < 0.03


# ---------------------------------------------------------------- files and CLI ---------------------------------------


def test_truth_round_trip_and_errors(tmp_path):
    _, t = simulate(seed=0, mode="dendrite", shape=(40, 40), n_neurons=3, n_frames=100, motion_px=0.5)
    path = save_truth(tmp_path / "movie_truth.npz", t)
    back = load_truth(path)
    for name, a in t.arrays().items():
        b = getattr(back, name)
        assert b.dtype == a.dtype and np.array_equal(a, b), name
    assert back.params == t.params and back.fps == t.fps and back.offset == t.offset
    assert [p.name for p in tmp_path.iterdir()] == ["movie_truth.npz"]  # no temporary file left
    with pytest.raises(ResultFileError, match="does not exist"):
        load_truth(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ResultFileError, match="not a readable"):
        load_truth(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", A=t.A)
    with pytest.raises(ResultFileError, match="lacks"):
        load_truth(tmp_path / "partial.npz")
    with pytest.raises(ResultFileError, match=".npz"):
        save_truth(tmp_path / "truth.json", t)


@pytest.mark.parametrize("name, extra, dtype", [("movie.tif", [], np.float32), ("m16.tif", ["--uint16"], np.uint16),
                                                ("movie.npy", ["--dendrites", "--motion", "0.5", "--background-level", "1000"], np.float32)])
def test_cli_writes_movie_and_truth(tmp_path, capsys, name, extra, dtype):
    from jaxcnmf.cli import main
    from jaxcnmf.io import load_movie

    out = tmp_path / name
    args = ["simulate", "-o", str(out), "--seed", "2", "--height", "32", "--width", "36", "--frames", "60",
            "--neurons", "3", "--snr", "4", "--offset", "100"] + extra
    assert main(args) == 0
    truth_file = tmp_path / (out.stem + "_truth.npz")
    assert out.is_file() and truth_file.is_file()
    printed = capsys.readouterr().out
    assert str(out) in printed and truth_file.name in printed
    kw = dict(shape=(32, 36), n_frames=60, n_neurons=3, peak_snr=4.0, offset=100.0, quantize="--uint16" in extra)
    if "--dendrites" in extra:
        kw.update(mode="dendrite", motion_px=0.5, background_level=1000.0)
    expected, truth = simulate(seed=2, **kw)
    if out.suffix == ".npy":
        assert np.load(out).dtype == dtype
    else:
        import tifffile

        assert tifffile.imread(out).dtype == dtype
    np.testing.assert_array_equal(load_movie(out), expected)
    back = load_truth(truth_file)
    assert np.array_equal(back.A, truth.A) and np.array_equal(back.C, truth.C)


def test_cli_rejects_bad_output_before_simulating(tmp_path, capsys):
    from jaxcnmf.cli import main

    assert main(["simulate", "-o", str(tmp_path / "movie.avi")]) == 2
    assert main(["simulate", "-o", str(tmp_path / "no" / "movie.tif")]) == 2
    assert main(["simulate", "-o", str(tmp_path / "movie.tif"), "--overlap", "2"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
