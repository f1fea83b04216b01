"""Scoring: footprint matching on hand-made cases, brute-force checks of the assignment, correlations and spike
binning against direct references, NeuroFinder regions, and the `jaxcnmf score` command."""

from __future__ import annotations

import itertools
import json
import math
import sys
import types
from fractions import Fraction

import numpy as np
import pytest

from jaxcnmf.errors import JaxcnmfError, ParameterError, ResultFileError
from jaxcnmf.metrics import (
    assign,
    bin_edges,
    bin_trace,
    binarize_footprints,
    footprint_centroids,
    jaccard_cost,
    load_regions,
    match_footprints,
    pearson,
    score_result,
    spike_correlations,
    trace_correlations,
)

from conftest import shared_path

H, W = 32, 40


def disk(center, radius, shape=(H, W), amp=1.0):
    """A Gaussian-ish blob cut at `radius` pixels: a float footprint with a clear support."""
    r, c = np.mgrid[: shape[0], : shape[1]]
    d2 = (r - center[0]) ** 2 + (c - center[1]) ** 2
    return np.where(d2 <= radius**2, amp * np.exp(-d2 / (2.0 * radius**2)), 0.0)


CENTERS = [(6, 6), (6, 20), (6, 33), (18, 8), (18, 22), (26, 34)]


def footprints(shift=(0, 0), centers=CENTERS, radius=4):
    return np.stack([disk((r + shift[0], c + shift[1]), radius, amp=1.0 + k) for k, (r, c) in enumerate(centers)])


def traces(K=len(CENTERS), T=300, seed=0):
    rng = np.random.default_rng(seed)
    S = (rng.random((K, T)) < 0.05) * rng.uniform(0.5, 2.0, (K, T))
    C = np.zeros_like(S)
    for t in range(T):
        C[:, t] = (0.9 * C[:, t - 1] if t else 0) + S[:, t]
    return C, S


# ----------------------------------------------------------------------------------------------------------------------
# Matching on hand-made cases


def test_perfect_match_scores_one():
    A = footprints()
    C, S = traces()
    m = match_footprints(A, A)
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(m.pairs, np.stack([np.arange(6)] * 2, axis=1))
    np.testing.assert_allclose(m.costs, 0.0)
    np.testing.assert_allclose(trace_correlations(C, C, m.pairs), 1.0)
    np.testing.assert_allclose(spike_correlations(S, S, m.pairs, fps=30.0), 1.0)
    s = score_result({"A": A, "C": C, "S": S}, truth={"A": A, "C": C, "S": S, "fps": 30.0})
    assert s["f1"] == 1.0 and s["matched"] == 6
    assert s["calcium_corr_median"] == pytest.approx(1.0) and s["spike_corr_median"] == pytest.approx(1.0)


def test_small_shift_matches_and_large_shift_does_not():
    A = footprints()
    small = match_footprints(footprints(shift=(1, 0)), A)
    assert small.f1 == 1.0
    np.testing.assert_array_equal(small.pairs[:, 0], small.pairs[:, 1])
    assert np.all(small.costs > 0) and np.all(small.costs <= 0.7)
    # Moved by 5 pixels (more than a radius): no overlap passes Jaccard >= 0.3.
    large = match_footprints(footprints(shift=(0, 5)), A)
    assert large.n_matched == 0 and large.f1 == 0.0
    # The cut-off is the one documented: with max_cost = 1 every overlapping pair is allowed again.
    loose = match_footprints(footprints(shift=(0, 5)), A, max_cost=0.999)
    assert loose.n_matched > 0


def test_cutoff_is_exactly_jaccard_threshold():
    a = np.zeros((1, 1, 10), bool)
    b = np.zeros((1, 1, 10), bool)
    a[0, 0, :6] = True
    b[0, 0, 3:] = True  # intersection 3, union 10: Jaccard 0.3, cost 0.7
    assert jaccard_cost(a, b)[0, 0] == pytest.approx(0.7)
    assert match_footprints(a, b, max_cost=0.7 + 1e-12).n_matched == 1
    assert match_footprints(a, b, max_cost=0.69).n_matched == 0


def test_missing_components_lower_recall_exactly():
    A = footprints()
    m = match_footprints(A[[0, 2, 5]], A)
    assert m.precision == 1.0 and m.recall == pytest.approx(3 / 6) and m.f1 == pytest.approx(2 / 3)
    np.testing.assert_array_equal(m.pairs, [[0, 0], [1, 2], [2, 5]])
    np.testing.assert_array_equal(m.unmatched_true, [1, 3, 4])


def test_extra_components_lower_precision_exactly():
    A = footprints()
    extra = footprints(centers=[(28, 4), (27, 20)])
    m = match_footprints(np.concatenate([A, extra]), A)
    assert m.recall == 1.0 and m.precision == pytest.approx(6 / 8) and m.f1 == pytest.approx(2 * 0.75 / 1.75)
    np.testing.assert_array_equal(m.unmatched_est, [6, 7])


def test_swapped_order_recovers_permutation():
    A = footprints()
    perm = np.array([3, 0, 5, 1, 4, 2])
    m = match_footprints(A[perm], A)
    assert m.f1 == 1.0
    np.testing.assert_array_equal(m.pairs[:, 1], perm)
    C, _ = traces()
    np.testing.assert_allclose(trace_correlations(C[perm], C, m.pairs), 1.0)


def test_one_estimate_over_two_truths_matches_only_one():
    t = np.zeros((2, 1, 20), bool)
    t[0, 0, 0:6] = True
    t[1, 0, 6:12] = True
    e = np.zeros((1, 1, 20), bool)
    e[0, 0, 1:12] = True  # Jaccard 5/11 with the first, 6/11 with the second
    m = match_footprints(e, t)
    np.testing.assert_array_equal(m.pairs, [[0, 1]])
    assert m.precision == 1.0 and m.recall == 0.5
    np.testing.assert_array_equal(m.unmatched_true, [0])


def test_empty_sides_are_defined():
    A = footprints()
    none = np.zeros((0, H, W))
    m = match_footprints(none, A)
    assert (m.n_est, m.n_true, m.n_matched) == (0, 6, 0)
    assert (m.precision, m.recall, m.f1) == (1.0, 0.0, 0.0)
    m = match_footprints(A, none)
    assert (m.precision, m.recall, m.f1) == (0.0, 1.0, 0.0)
    m = match_footprints(none, none)
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    s = score_result({"A": none, "C": np.zeros((0, 50))}, truth={"A": A, "C": np.ones((6, 50))})
    assert s["f1"] == 0.0 and s["calcium_corr"] == [] and s["calcium_corr_median"] is None
    # An all-zero footprint is empty and never matches.
    m = match_footprints(np.concatenate([A, np.zeros((1, H, W))]), A)
    assert m.n_matched == 6 and list(m.unmatched_est) == [6]


def test_centroid_method():
    A = footprints()
    cen = footprint_centroids(A)
    np.testing.assert_allclose(cen, np.array(CENTERS, float), atol=1e-9)  # symmetric blobs: centroid = centre
    m = match_footprints(footprints(shift=(-2, 0)), A, method="centroid")
    assert m.f1 == 1.0 and m.max_cost == pytest.approx(np.sqrt(binarize_footprints(A).sum((1, 2)).mean() / np.pi),
                                                       rel=0.2)
    np.testing.assert_allclose(m.costs, 2.0, atol=1e-9)
    assert match_footprints(footprints(shift=(-2, 0)), A, method="centroid", max_cost=1.5).n_matched == 0


def test_binarize_threshold_and_masks_as_given():
    a = np.array([[[0.0, 0.1, 0.5, 1.0, -2.0]]])
    np.testing.assert_array_equal(binarize_footprints(a, 0.2), [[[False, False, True, True, False]]])
    np.testing.assert_array_equal(binarize_footprints(a, 0.0), [[[False, True, True, True, False]]])
    m = np.array([[[True, False, True, False, False]]])
    assert binarize_footprints(m, 0.9) is m
    with pytest.raises(ParameterError, match="threshold"):
        binarize_footprints(a, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# References: assignment against brute force, Jaccard against sets, Pearson against np.corrcoef


def brute_force(cost, max_cost):
    """Most accepted pairs, then least total cost, by enumerating every injective assignment."""
    ne, nt = cost.shape
    best = (0, 0.0)
    for k in range(min(ne, nt), 0, -1):
        for rows in itertools.combinations(range(ne), k):
            for cols in itertools.permutations(range(nt), k):
                c = cost[list(rows), list(cols)]
                if np.all(c <= max_cost) and (k > best[0] or (k == best[0] and c.sum() < best[1])):
                    best = (k, float(c.sum()))
        if best[0]:
            break
    return best


def test_assignment_prefers_more_matches_over_lower_total_cost():
    # The cheapest full assignment (0,0)+(1,1) = 0.95 has one pair above the cut-off; (0,1)+(1,0) = 1.0 has none.
    pairs, costs = assign(np.array([[0.0, 0.5], [0.5, 0.95]]), 0.6)
    np.testing.assert_array_equal(pairs, [[0, 1], [1, 0]])
    np.testing.assert_allclose(costs, [0.5, 0.5])


@pytest.mark.parametrize("seed", range(30))
def test_assignment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    ne, nt = rng.integers(1, 5, size=2)
    cost = rng.random((ne, nt))
    cost[rng.random((ne, nt)) < 0.1] = np.inf  # centroid costs can be inf (empty footprints)
    pairs, costs = assign(cost, 0.6)
    k, total = brute_force(cost, 0.6)
    assert pairs.shape[0] == k and costs.sum() == pytest.approx(total)
    assert len(set(pairs[:, 0])) == k and len(set(pairs[:, 1])) == k
    np.testing.assert_array_equal(costs, cost[pairs[:, 0], pairs[:, 1]])


def test_jaccard_against_python_sets():
    rng = np.random.default_rng(1)
    e = rng.random((4, 6, 7)) < 0.3
    t = rng.random((3, 6, 7)) < 0.3
    t[2] = False
    cost = jaccard_cost(e, t)
    for i, j in itertools.product(range(4), range(3)):
        se, st = set(np.flatnonzero(e[i])), set(np.flatnonzero(t[j]))
        union = se | st
        ref = 1.0 - (len(se & st) / len(union) if union else 0.0)
        assert cost[i, j] == pytest.approx(ref)


def test_pearson_against_corrcoef_and_constant_is_nan():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2, 5, 40))
    ref = [np.corrcoef(a, b)[0, 1] for a, b in zip(x, y)]
    np.testing.assert_allclose(pearson(x, y), ref, rtol=1e-12)
    np.testing.assert_allclose(pearson(x, -3 * x + 1), -1.0)
    with np.errstate(all="raise"):  # no warnings on constant input, just NaN
        r = pearson(np.ones(10), np.arange(10.0))
    assert np.isnan(r)


def test_constant_traces_are_nan_not_crash():
    A = footprints()
    C, S = traces()
    C_est, S_est = C.copy(), S.copy()
    C_est[1] = 0.0
    S_est[1] = 0.0
    s = score_result({"A": A, "C": C_est, "S": S_est}, truth={"A": A, "C": C, "S": S}, fps=30.0)
    assert s["calcium_corr"][1] is None and s["spike_corr"][1] is None
    assert s["calcium_corr_n_nan"] == 1 and s["calcium_corr_median"] == pytest.approx(1.0)
    json.dumps(s, allow_nan=False)  # strictly valid JSON


# ----------------------------------------------------------------------------------------------------------------------
# Spike binning


@pytest.mark.parametrize("fps,T", [(30.0, 300), (30.0, 301), (100.0, 1000), (100.0, 1003), (7.5, 50), (29.97, 9000)])
def test_binning_preserves_counts(fps, T):
    rng = np.random.default_rng(int(fps) + T)
    s = rng.poisson(0.3, size=(3, T)).astype(float)
    b = bin_trace(s, fps, 0.04)
    np.testing.assert_allclose(b.sum(-1), s.sum(-1))
    # Reference in exact rational arithmetic: frame i at time i / fps belongs to the 40 ms bin floor(time / 0.04)
    # (frames coarser than bins: each frame its own bin), summed with an explicit loop.
    per_bin = max(Fraction(str(fps)) * Fraction(1, 25), Fraction(1))
    idx = [math.floor(i / per_bin) for i in range(T)]
    ref = np.zeros((3, max(idx) + 1))
    for i, k in enumerate(idx):
        ref[:, k] += s[:, i]
    np.testing.assert_allclose(b, ref)


def test_bin_edges_exact_counts():
    # 100 Hz, 40 ms: 4 frames per bin; 30 Hz: 1.2 frames per bin, so 6 frames fill 5 bins exactly.
    np.testing.assert_array_equal(np.bincount(bin_edges(1000, 100.0)), np.full(250, 4))
    counts = np.bincount(bin_edges(300, 30.0))
    assert counts.size == 250 and counts.sum() == 300
    np.testing.assert_array_equal(counts[:5], [2, 1, 1, 1, 1])
    np.testing.assert_array_equal(bin_edges(5, 7.0), np.arange(5))  # slower than one frame per bin
    with pytest.raises(ParameterError, match="fps"):
        bin_edges(10, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth from files, and errors


def test_load_regions_roundtrip_and_errors(tmp_path):
    regions = [{"id": 7, "coordinates": [[0, 0], [0, 1], [2, 3]]}, {"id": 8, "coordinates": [[4, 5]]}]
    p = tmp_path / "regions.json"
    p.write_text(json.dumps(regions))
    masks = load_regions(p, (5, 6))
    assert masks.shape == (2, 5, 6) and masks.dtype == bool
    assert masks[0].sum() == 3 and masks[0, 2, 3] and masks[1, 4, 5]
    with pytest.raises(ResultFileError, match=r"outside the movie's 5x5"):
        load_regions(p, (5, 5))
    with pytest.raises(ResultFileError, match="does not exist"):
        load_regions(tmp_path / "nope.json", (5, 6))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultFileError, match="not readable JSON"):
        load_regions(tmp_path / "bad.json", (5, 6))
    (tmp_path / "bad2.json").write_text(json.dumps([{"id": 1, "coordinates": [[1.5, 2]]}]))
    with pytest.raises(ResultFileError, match="integer"):
        load_regions(tmp_path / "bad2.json", (5, 6))


def test_score_result_needs_exactly_one_truth():
    A = footprints()
    with pytest.raises(ParameterError, match="--truth|truth"):
        score_result({"A": A})
    with pytest.raises(ParameterError, match="got both"):
        score_result({"A": A}, truth={"A": A}, regions=A > 0)
    with pytest.raises(ParameterError, match="32x40"):
        score_result({"A": A}, truth={"A": A[:, :10]})
    with pytest.raises(ParameterError, match="frames"):
        score_result({"A": A, "C": np.ones((6, 10))}, truth={"A": A, "C": np.ones((6, 11))})
    assert issubclass(ParameterError, JaxcnmfError)


def test_score_result_accepted_only_keeps_original_indices():
    A = footprints()
    accepted = np.array([True, False, True, True, False, True])
    s = score_result({"A": A, "accepted": accepted}, truth={"A": A})
    assert s["n_components"] == 6 and s["n_est"] == 4 and s["precision"] == 1.0 and s["recall"] == pytest.approx(4 / 6)
    assert s["pairs"] == [[0, 0], [2, 2], [3, 3], [5, 5]]
    s = score_result({"A": A, "accepted": accepted}, truth={"A": A}, accepted_only=False)
    assert s["f1"] == 1.0


def test_neurofinder_regions_score_themselves_perfectly():
    path = shared_path("neurofinder_tr", "regions.json")
    masks = load_regions(path, (256, 256))
    assert masks.shape == (54, 256, 256) and masks.dtype == bool
    assert np.all(masks.sum((1, 2)) > 0)
    raw = json.loads(path.read_text())
    assert masks[5].sum() == len({tuple(rc) for rc in raw[5]["coordinates"]})
    s = score_result({"A": masks}, regions=path)
    assert (s["n_est"], s["n_true"], s["matched"], s["f1"]) == (54, 54, 54, 1.0)
    assert s["pairs"] == [[k, k] for k in range(54)]
    # Shuffled, the same regions are still matched to themselves.
    perm = np.random.default_rng(0).permutation(54)
    m = match_footprints(masks[perm], masks)
    np.testing.assert_array_equal(m.pairs[:, 1], perm)


# ----------------------------------------------------------------------------------------------------------------------
# The command line


def _install_io_stand_in(monkeypatch):
    """If `jaxcnmf.io` is not written yet, a stand-in `load_result` reading the result-file layout from .npz."""
    try:
        import jaxcnmf.io  # noqa: F401
    except ImportError:
        from jaxcnmf.result import Result

        mod = types.ModuleType("jaxcnmf.io")
        mod.load_result = lambda path: Result.from_arrays(dict(np.load(path)))
        monkeypatch.setitem(sys.modules, "jaxcnmf.io", mod)


def test_cli_score_prints_table_and_writes_json(tmp_path, monkeypatch, capsys):
    from jaxcnmf.cli import main

    _install_io_stand_in(monkeypatch)
    A = footprints()
    C, S = traces(T=120)
    K, T = C.shape
    est = {
        "A": A[[1, 0, 2, 3]].astype(np.float32),  # components 4, 5 missed
        "C": (3.0 * C[[1, 0, 2, 3]]).astype(np.float32),
        "S": (3.0 * S[[1, 0, 2, 3]]).astype(np.float32),
        "b": np.ones((1, H, W), np.float32),
        "f": np.ones((1, T), np.float32),
        "sn": np.ones((H, W), np.float32),
        "g": np.full((4, 1), 0.9, np.float32),
        "YrA": np.zeros((4, T), np.float32),
    }
    np.savez(tmp_path / "fit.npz", **est)
    np.savez(tmp_path / "movie_truth.npz", A=A, C=C, S=S, fps=np.float64(30.0))
    rc = main(["score", str(tmp_path / "fit.npz"), "--truth", str(tmp_path / "movie_truth.npz")])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("precision", "recall", "F1", "calcium corr", "spike corr", "40 ms"):
        assert word in out
    scores = json.loads((tmp_path / "fit_scores.json").read_text())
    assert scores["matched"] == 4 and scores["precision"] == 1.0 and scores["recall"] == pytest.approx(4 / 6)
    assert scores["pairs"] == [[0, 1], [1, 0], [2, 2], [3, 3]]
    assert scores["calcium_corr_median"] == pytest.approx(1.0, abs=1e-6)
    assert scores["fps"] == 30.0 and scores["spike_bin_s"] == pytest.approx(0.04)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.npz", "fit_scores.json", "movie_truth.npz"]

    rc = main(["score", str(tmp_path / "fit.npz"), "--truth", str(tmp_path / "movie_truth.npz"),
               "--method", "centroid", "-o", str(tmp_path / "c.json")])
    assert rc == 0 and json.loads((tmp_path / "c.json").read_text())["method"] == "centroid"


def test_cli_score_clear_errors(tmp_path, capsys):
    from jaxcnmf.cli import main

    (tmp_path / "fit.npz").write_bytes(b"")
    assert main(["score", str(tmp_path / "fit.npz")]) == 2
    assert "--truth" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.npz"), "--regions", "r.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_scores_a_simulator_truth_file(tmp_path):
    """The truth file written by `jaxcnmf.sim.save_truth` is read as ground truth (A, C, S and fps)."""
    sim = pytest.importorskip("jaxcnmf.sim", reason="the simulator is not available")
    _, truth = sim.simulate(seed=3, n_frames=200, shape=(48, 48), n_neurons=8)
    sim.save_truth(tmp_path / "movie_truth.npz", truth)
    K = truth.A.shape[0]
    perm = np.random.default_rng(0).permutation(K)
    est = {"A": truth.A[perm], "C": truth.C[perm], "S": truth.S[perm]}
    s = score_result(est, truth=tmp_path / "movie_truth.npz")
    assert (s["n_true"], s["matched"], s["f1"]) == (K, K, 1.0)
    assert sorted(s["pairs"]) == sorted([[i, int(j)] for i, j in enumerate(perm)])
    assert s["fps"] == truth.fps and s["calcium_corr_median"] == pytest.approx(1.0)
    # Dropping the first two estimates lowers recall by exactly 2 / K.
    s = score_result({k: v[2:] for k, v in est.items()}, truth=truth)
    assert s["recall"] == pytest.approx((K - 2) / K) and s["precision"] == 1.0


def test_active_regions_picks_the_regions_brighter_than_the_correlation_images_quantile():
    from jaxcnmf.metrics import active_regions

    rng = np.random.default_rng(0)
    ci = 0.02 * rng.random((30, 30))
    masks = np.zeros((3, 30, 30), bool)
    masks[0, 2:6, 2:6] = True  # active: correlated pixels
    masks[1, 10:14, 10:14] = True  # silent: background level
    masks[2, 20:23, 20:23] = True  # active, smaller
    ci[2:6, 2:6] = 0.4
    ci[20:23, 20:23] = 0.3
    np.testing.assert_array_equal(active_regions(masks, ci), [True, False, True])
    quiet = ci.copy()
    quiet[20:23, 20:23] = 0.0  # the third region falls silent
    np.testing.assert_array_equal(active_regions(masks, quiet), [True, False, False])
    with pytest.raises(ParameterError, match="do not match"):
        active_regions(masks[:, :10], ci)
    with pytest.raises(ParameterError, match="quantile"):
        active_regions(masks, ci, quantile=1.0)
