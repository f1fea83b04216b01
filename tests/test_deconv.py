"""Tests of jaxcnmf.deconv: exactness against float64 references and duality certificates, OASIS agreement, s_min,
compile-once, degenerate traces, float32 vs float64, and gradients vs finite differences."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _reference as R
from jaxcnmf import deconv
from jaxcnmf.deconv import DeconvResult, deconvolve, deconvolve_batch
from jaxcnmf.errors import ParameterError, TraceError

AR1 = (0.95,)
AR2 = (1.6, -0.63)  # roots 0.9 and 0.7


def _batch(rng, g, lengths, sn_levels, T=None):
    """Traces of the given lengths padded (with NaN) to a common T, with their noise levels."""
    T = T or max(lengths)
    Y = np.full((len(lengths), T), np.nan)
    sns = np.empty(len(lengths))
    for i, L in enumerate(lengths):
        sns[i] = sn_levels[i % len(sn_levels)]
        Y[i, :L] = R.simulate_trace(rng, L, g, sns[i], rate=rng.uniform(0.01, 0.08), b=rng.uniform(-1, 2))
    return Y, sns


def _check_certified(Y, g, sns, lengths, out, tol=1e-3):
    """Objective within tol of a certified lower bound on the optimum, and the noise constraint met to tol."""
    gaps = []
    for i, L in enumerate(lengths):
        y = Y[i, :L]
        c = np.asarray(out.c[i, :L], np.float64)
        s = np.asarray(out.s[i, :L], np.float64)
        r = y - float(out.b[i]) - c
        assert np.all(s >= -1e-9), i
        assert np.all(np.asarray(out.c[i, L:]) == 0) and np.all(np.asarray(out.s[i, L:]) == 0)
        rss, target = r @ r, sns[i] ** 2 * L
        assert rss <= target * (1 + tol), (i, rss / target)
        if float(out.lam[i]) > 0:  # the constraint is active at the optimum
            assert rss >= target * (1 - tol), (i, rss / target)
        obj, lb = R.constrained_gap(y, g, sns[i], s, r=r)
        gap = (obj - lb) / max(obj, 1e-12)
        gaps.append(gap)
        assert lb <= obj * (1 + 1e-9) + 1e-9
        assert gap <= tol, (i, L, gap)
    return np.array(gaps)


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_constrained_is_optimal_on_many_traces(g):
    """>= 50 traces per AR order (100+ in all), lengths 200..20,000, three noise levels: objective within 1e-3 of a
    certified lower bound on the exact optimum (weak duality), noise constraint met to 1e-3."""
    rng = np.random.default_rng(len(g))
    lengths = list(rng.integers(200, 2001, size=48))
    Y, sns = _batch(rng, g, lengths, (0.1, 0.3, 0.6), T=2000)
    long_lengths = [5000, 20000]
    Yl, snl = _batch(rng, g, long_lengths, (0.2, 0.4))
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, np.array(g), sns, length=np.array(lengths))
        outl = deconvolve_batch(Yl, np.array(g), snl, length=np.array(long_lengths))
    _check_certified(Y, g, sns, lengths, out)
    _check_certified(Yl, g, snl, long_lengths, outl)


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_constrained_matches_dense_reference(g):
    """Objective, baseline and lam equal those of an independent dense NNLS + root-search solver."""
    rng = np.random.default_rng(7)
    Y, sns = _batch(rng, g, [150, 150], (0.2, 0.5))
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, np.array(g), sns)
    for i in range(2):
        ref = R.constrained_nnls(Y[i], g, sns[i])
        obj = float(np.sum(out.s[i]))
        assert obj == pytest.approx(ref["obj"], rel=1e-6)
        assert float(out.b[i]) == pytest.approx(ref["b"], rel=1e-5, abs=1e-7)
        assert float(out.lam[i]) == pytest.approx(ref["lam"], rel=1e-5)
        np.testing.assert_allclose(np.asarray(out.c[i]), ref["c"], atol=1e-6 * np.ptp(Y[i]))


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
@pytest.mark.parametrize("baseline", [True, 0.7], ids=["b_free", "b_fixed"])
def test_penalized_matches_dense_reference(g, baseline):
    rng = np.random.default_rng(3)
    y = R.simulate_trace(rng, 160, g, 0.3, b=0.7)
    lam = 0.8
    with jax.enable_x64(True):
        out = deconvolve(y, np.array(g), 0.3, lam=lam, baseline=baseline)
    ref = R.penalized_nnls(y, g, lam, b=None if baseline is True else baseline)
    c = np.asarray(out.c)
    r = y - float(out.b) - c
    obj = 0.5 * r @ r + lam * float(np.sum(out.s))
    assert obj == pytest.approx(ref["obj"], rel=1e-9)
    np.testing.assert_allclose(c, ref["c"], atol=1e-7)
    assert float(out.lam) == lam
    primal, lb = R.penalized_gap(y, g, lam, np.asarray(out.s), r, b_free=baseline is True, b=0.7)
    assert primal - lb <= 1e-8 * primal


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_fixed_c1_and_baseline(g):
    """With c1 and b fixed, s_0 is an ordinary penalised spike: matches the reference with q_0 = 1."""
    rng = np.random.default_rng(4)
    y = R.simulate_trace(rng, 120, g, 0.2, b=0.5, c0=2.0)
    with jax.enable_x64(True):
        out = deconvolve(y, np.array(g), 0.2, lam=0.5, baseline=0.5, c1=0.0)
    ref = R.penalized_nnls(y, g, 0.5, b=0.5, c1_free=False)
    np.testing.assert_allclose(np.asarray(out.c), ref["c"], atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.s), ref["s"], atol=1e-7)
    assert float(out.c1) == 0.0 and float(out.b) == 0.5


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_agrees_with_oasis(g):
    oasis_functions = pytest.importorskip("oasis.functions")
    rng = np.random.default_rng(5)
    Y, sns = _batch(rng, g, [3000] * 8, (0.2, 0.4))
    with jax.enable_x64(True):
        out = deconvolve_batch(Y, np.array(g), sns)
    for i in range(len(Y)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, s_oasis, *_ = oasis_functions.deconvolve(Y[i], g=g, sn=sns[i], penalty=1)
        s = np.asarray(out.s[i])
        # OASIS folds the initial value into s[0]; compare from frame 1
        corr = np.corrcoef(s[1:], s_oasis[1:])[0, 1]
        assert corr >= 0.99, (i, corr)


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
def test_s_min(g):
    rng = np.random.default_rng(6)
    Y, sns = _batch(rng, g, [1500] * 4, (0.2,))
    with jax.enable_x64(True):
        plain = deconvolve_batch(Y, np.array(g), sns)
        zero = deconvolve_batch(Y, np.array(g), sns, s_min=0.0)
        thr = deconvolve_batch(Y, np.array(g), sns, s_min=0.5)
    np.testing.assert_array_equal(np.asarray(plain.s), np.asarray(zero.s))
    s = np.asarray(thr.s)[:, 1:]
    assert np.all((s == 0) | (s >= 0.5 - 1e-9))
    assert (s > 0).sum() < (np.asarray(plain.s)[:, 1:] > 1e-9).sum()
    assert (s >= 0.5).sum() > 0
    r = Y - np.asarray(thr.b)[:, None] - np.asarray(thr.c)
    assert np.all(np.sum(r**2, axis=1) <= sns**2 * Y.shape[1] * (1 + 1e-3))


def test_compiles_once_per_shape():
    rng = np.random.default_rng(8)
    Y, sns = _batch(rng, AR1, [400] * 3, (0.3,))
    before = deconv._TRACE_COUNT["batch"]
    deconvolve_batch(Y, np.array(AR1), sns)
    after_first = deconv._TRACE_COUNT["batch"]
    deconvolve_batch(Y * 2 + 1, np.array([0.9]), sns * 2, length=[400, 300, 200])  # new values, lengths
    deconvolve_batch(Y[::-1], np.array([[0.8], [0.9], [0.95]]), 0.5, length=np.array([100, 399, 400]))
    assert deconv._TRACE_COUNT["batch"] - before <= 1
    assert deconv._TRACE_COUNT["batch"] == after_first


def test_padded_trace_equals_unpadded():
    rng = np.random.default_rng(9)
    y = R.simulate_trace(rng, 700, AR2, 0.3)
    Y = np.full((2, 1000), np.nan)
    Y[0, :700] = y
    Y[1] = R.simulate_trace(rng, 1000, AR2, 0.3)
    with jax.enable_x64(True):
        padded = deconvolve_batch(Y, np.array(AR2), 0.3, length=[700, 1000])
        alone = deconvolve(y, np.array(AR2), 0.3)
    np.testing.assert_allclose(np.asarray(padded.c[0, :700]), np.asarray(alone.c), atol=1e-9)
    np.testing.assert_allclose(float(padded.lam[0]), float(alone.lam), rtol=1e-9)
    assert np.all(np.asarray(padded.c[0, 700:]) == 0)


def test_float32_matches_float64():
    rng = np.random.default_rng(10)
    for g in (AR1, AR2):
        Y, sns = _batch(rng, g, [2000] * 4, (0.1, 0.3))
        out32 = deconvolve_batch(Y.astype(np.float32), np.array(g), sns)
        assert out32.c.dtype == jnp.float32
        with jax.enable_x64(True):
            out64 = deconvolve_batch(Y, np.array(g), sns)
        c32, c64 = np.asarray(out32.c, np.float64), np.asarray(out64.c)
        rel = np.linalg.norm(c32 - c64, axis=1) / np.linalg.norm(c64, axis=1)
        assert np.all(rel <= 1e-4), rel


def test_degenerate_traces():
    T = 200
    zero = np.zeros(T)
    const = np.full(T, 3.0)
    with jax.enable_x64(True):
        out = deconvolve_batch(np.stack([zero, const]), np.array(AR1), 0.0)
        out_noise = deconvolve_batch(np.stack([zero, const]), np.array(AR2), 0.5)
    for o in (out, out_noise):
        assert np.all(np.isfinite(np.asarray(o.c))) and np.all(np.isfinite(np.asarray(o.lam)))
        np.testing.assert_allclose(np.asarray(o.c), 0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(o.s), 0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(o.b), [0.0, 3.0], atol=1e-9)


def test_bad_inputs_raise_before_compiling():
    y = np.random.default_rng(0).standard_normal((3, 100))
    y[1, 40] = np.nan
    with pytest.raises(TraceError, match="trace 1 .* frame 40"):
        deconvolve_batch(y, np.array(AR1), 0.3)
    with pytest.raises(TraceError, match="needs at least 8"):
        deconvolve_batch(np.zeros((2, 7)), np.array(AR2), 0.3)
    with pytest.raises(TraceError, match="trace 0"):
        deconvolve(np.zeros(3), np.array(AR1), 0.3)
    with pytest.raises(ParameterError, match="g"):
        deconvolve(np.zeros(50), np.array([1.1]), 0.3)
    with pytest.raises(ParameterError, match="s_min"):
        deconvolve(np.zeros(50), np.array([0.9]), 0.3, s_min=-1)
    with pytest.raises(ParameterError, match="baseline"):
        deconvolve(np.zeros(50), np.array([0.9]), 0.3, baseline="yes")
    # trailing NaN padding is fine when the lengths say so
    Y = np.random.default_rng(1).standard_normal((2, 100))
    Y[0, 60:] = np.nan
    out = deconvolve_batch(Y, np.array(AR1), 1.0, length=[60, 100])
    assert np.all(np.isfinite(np.asarray(out.c)))


def test_deconvolve_is_jit_and_vmap_able():
    rng = np.random.default_rng(11)
    Y, sns = _batch(rng, AR2, [300] * 3, (0.3,))
    g = jnp.asarray(AR2)
    vm = jax.jit(jax.vmap(lambda y, sn: deconvolve(y, g, sn)))(jnp.asarray(Y, jnp.float32), jnp.asarray(sns, jnp.float32))
    batch = deconvolve_batch(Y.astype(np.float32), np.array(AR2), sns)
    assert isinstance(vm, DeconvResult)
    np.testing.assert_allclose(np.asarray(vm.c), np.asarray(batch.c), rtol=1e-5, atol=1e-5)


def test_estimates_g_and_sn_when_missing():
    pytest.importorskip("jaxcnmf.noise")
    rng = np.random.default_rng(12)
    y = R.simulate_trace(rng, 3000, AR1, 0.2)
    out = deconvolve(y.astype(np.float32), p=1)
    assert out.g.shape == (1,) and 0.8 < float(out.g[0]) < 1.0
    assert float(out.sn) == pytest.approx(0.2, rel=0.2)


@pytest.mark.parametrize("g", [AR1, AR2], ids=["ar1", "ar2"])
@pytest.mark.parametrize("lam", [None, 0.6], ids=["constrained", "penalised"])
def test_gradients_match_finite_differences(g, lam):
    """d loss / d y and d loss / d g of loss = w1'c + w2's, against central differences (float64)."""
    rng = np.random.default_rng(13)
    T = 60
    y0 = R.simulate_trace(rng, T, g, 0.2, rate=0.1)
    w1, w2 = rng.standard_normal(T), rng.standard_normal(T)
    with jax.enable_x64(True):
        def loss(y, gg):
            out = deconvolve(y, gg, 0.2, lam=lam)
            return jnp.sum(w1 * out.c) + jnp.sum(w2 * out.s) + out.b + out.lam

        y0j, gj = jnp.asarray(y0), jnp.asarray(g)
        gy, gg = jax.grad(loss, argnums=(0, 1))(y0j, gj)
        f = jax.jit(loss)
        eps = 1e-6
        for k in rng.choice(T, 8, replace=False):
            e = np.zeros(T)
            e[k] = eps
            fd = (f(y0j + e, gj) - f(y0j - e, gj)) / (2 * eps)
            assert float(gy[k]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
        for j in range(len(g)):
            e = np.zeros(len(g))
            e[j] = 1e-7
            fd = (f(y0j, gj + e) - f(y0j, gj - e)) / 2e-7
            assert float(gg[j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-5)
