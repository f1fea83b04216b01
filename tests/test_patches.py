"""Patch mode: tiling, exact compressions against the full-movie stages (float64), streamed statistics, accuracy of a
patch fit against a whole-field fit, neurons planted on patch borders (no duplicate, no split), input checks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _scale_movies import CENTRES, FPS, N_BORDER, OVERLAP, PATCH, RADIUS, planted_movie

from jaxcnmf.errors import ParameterError
from jaxcnmf.patches import (
    ProgressBar,
    Streamer,
    chunk_frames_for_budget,
    compress_pixels,
    compress_time,
    fit_patches,
    owner_map,
    parse_memory_budget,
    patch_grid,
)

# ---------------------------------------------------------------------------------------------------- tiling, budget


@pytest.mark.parametrize("shape,ps,ov", [((96, 96), 48, 16), ((100, 64), 48, 16), ((30, 200), 40, 12)])
def test_patch_grid_equal_covering_overlapping(shape, ps, ov):
    boxes = patch_grid(shape, ps, ov)
    H, W = shape
    sizes = {(b[1] - b[0], b[3] - b[2]) for b in boxes}
    assert sizes == {(min(ps, H), min(ps, W))}  # one size: one compiled fit serves every patch
    cover = np.zeros(shape, int)
    for r0, r1, c0, c1 in boxes:
        assert 0 <= r0 < r1 <= H and 0 <= c0 < c1 <= W
        cover[r0:r1, c0:c1] += 1
    assert cover.min() >= 1
    for axis in (0, 2):  # neighbouring patches share at least `ov` pixels
        starts = np.unique(boxes[:, axis])
        side = boxes[0, axis + 1] - boxes[0, axis]
        assert np.all(starts[:-1] + side - starts[1:] >= min(ov, side))
    owner = owner_map(boxes, shape)
    for p, (r0, r1, c0, c1) in enumerate(boxes):  # each patch owns a rectangle inside itself
        rows, cols = np.nonzero(owner == p)
        if rows.size:
            assert r0 <= rows.min() and rows.max() < r1 and c0 <= cols.min() and cols.max() < c1
            assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_memory_budget_and_chunks():
    assert parse_memory_budget("2GB") == 2 * 10**9
    assert parse_memory_budget("2GiB") == parse_memory_budget("2g") == 2 * 2**30
    assert parse_memory_budget(" 512 MiB ") == 512 * 2**20
    assert parse_memory_budget(3e9) == 3 * 10**9
    for bad in ("lots", "-1GB", 10, True, [1]):
        with pytest.raises(ParameterError, match="memory_budget"):
            parse_memory_budget(bad)
    small = chunk_frames_for_budget(2**30, 512 * 512, n_frames=20000)
    big = chunk_frames_for_budget(2**32, 512 * 512, n_frames=20000)
    assert 8 <= small < big <= 20000
    assert chunk_frames_for_budget(2**40, 512 * 512, n_frames=300) == 300
    # the chunk's working copies stay inside the budget
    assert small * 512 * 512 * 4 * 4 <= 2**30


# --------------------------------------------------------------------------------- exact compressions (float64)


def _toy(seed=0, H=6, W=5, K=3, nb=1, T=60, bg=1.0):
    rng = np.random.default_rng(seed)
    d = H * W
    A = np.zeros((d, K))
    for k in range(K):
        A[rng.choice(d, 8, replace=False), k] = rng.uniform(0.2, 1, 8)
    C = np.maximum(rng.normal(0, 1, (K, T)).cumsum(1) * 0.3 + 2, 0)
    b = bg * rng.uniform(0.5, 1, (d, nb))
    f = 5 + rng.normal(0, 0.2, (nb, T))
    sn = rng.uniform(0.2, 0.4, d)
    Y = A @ C + b @ f + sn[:, None] * rng.normal(size=(d, T))
    return Y, A, C, b, f, sn, (H, W)


# bg=1e5: a background 10^5 times brighter than the cells (a uint16 recording's baseline against unit-norm
# footprints): the compressions' rank must not depend on the units
@pytest.mark.parametrize("bg", [1.0, 1e5])
def test_compress_time_gives_the_full_spatial_update(bg):
    from jaxcnmf.spatial import update_spatial

    with jax.enable_x64(True):
        Y, A, C, b, f, sn, shape = _toy(bg=bg)
        f = f / bg  # the background in the traces instead: F's rows differ by orders of magnitude
        T = Y.shape[1]
        # a start away from the truth, so the update moves
        A0, C0 = A * 0.8 + 0.05 * (A > 0), C * 1.1
        Z = Y - A0 @ C0 - b @ f
        F = np.concatenate([C0, f])
        Yc, Cc, fc, snc = compress_time(Z @ F.T, (Z * Z).sum(1), A0, C0, b, f, sn, T)
        assert Yc.dtype == np.float64 and Yc.shape[1] < T
        kw = dict(radius=2.0, shape=shape)
        A_full, b_full = update_spatial(Y, A0, C0, b, f, sn, **kw)
        A_comp, b_comp = update_spatial(Yc, A0, Cc, b, fc, snc, **kw)
        assert np.abs(np.asarray(A_full)).max() > 0
        np.testing.assert_allclose(np.asarray(A_comp), np.asarray(A_full), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(np.asarray(b_comp), np.asarray(b_full), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bg", [1.0, 1e5])
def test_compress_pixels_gives_the_full_temporal_update(bg):
    from jaxcnmf.temporal import color_components, update_temporal

    with jax.enable_x64(True):
        Y, A, C, b, f, sn, shape = _toy(seed=1, bg=bg)
        M = np.concatenate([A, b], axis=1)
        Yp, Ap, bp = compress_pixels(M.T @ Y, A, b)
        assert Yp.shape[0] <= M.shape[1] and Yp.dtype == np.float64
        groups = color_components(A)
        full = update_temporal(Y, A, C, b, f, p=2, groups=groups)
        comp = update_temporal(Yp, Ap, C, bp, f, p=2, groups=groups)
        for name in ("C", "S", "YrA", "g", "f", "baseline"):
            np.testing.assert_allclose(np.asarray(getattr(comp, name)), np.asarray(getattr(full, name)),
                                       rtol=1e-6, atol=1e-7, err_msg=name)


def test_streamed_statistics_match_numpy():
    from jaxcnmf.io import open_movie

    Y, A, C, b, f, sn, (H, W) = _toy(seed=2, T=70)
    T = Y.shape[1]
    movie = np.ascontiguousarray(Y.T.reshape(T, H, W)).astype(np.float32)
    stream = Streamer(open_movie(movie), chunk_frames=16)  # 70 frames: four full chunks and a short one
    Zq, zz = stream.residual_statistics(A, C, b, f)
    Z = Y - A @ C - b @ f
    np.testing.assert_allclose(Zq, Z @ np.concatenate([C, f]).T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(zz, (Z * Z).sum(1), rtol=1e-4)
    M = np.concatenate([A, b], axis=1)
    np.testing.assert_allclose(stream.project(M), M.T @ Y, rtol=1e-5, atol=1e-3)


def test_progress_bar_reports_eta():
    import io

    out = io.StringIO()
    bar = ProgressBar(4, "patches", stream=out)
    bar.update(skipped=True)
    assert "1/4 patches" in out.getvalue() and "ETA ?" in out.getvalue()  # a resumed patch says nothing of the rate
    bar.update()
    assert "2/4 patches" in bar.line() and "ETA" in bar.line() and "ETA ?" not in bar.line()


# ------------------------------------------------------------------------------------------------ input checks


def test_bad_patch_arguments_raise_before_work(tmp_path):
    movie = np.zeros((40, 48, 48), np.float32)
    with pytest.raises(ParameterError, match="overlap"):
        fit_patches(movie, RADIUS, patch_size=PATCH, overlap=4)  # below one neuron diameter
    with pytest.raises(ParameterError, match="patch_size"):
        fit_patches(movie, RADIUS, patch_size=12, overlap=8)  # too small for a neuron
    with pytest.raises(ParameterError, match="memory_budget"):
        fit_patches(np.zeros((4000, 48, 48), np.float32), RADIUS, patch_size=PATCH, overlap=OVERLAP,
                    memory_budget="2MiB")
    with pytest.raises(ParameterError, match="engine"):
        fit_patches(movie + np.arange(40)[:, None, None], RADIUS, patch_size=PATCH, overlap=OVERLAP,
                    engine="spark")
    from jaxcnmf.patches import plan_patches

    plan_patches(movie, RADIUS, patch_size=PATCH, overlap=OVERLAP, checkpoint_dir=str(tmp_path))
    with pytest.raises(ParameterError, match="checkpoint_dir"):  # a folder of another run is not mixed in
        plan_patches(movie, RADIUS, patch_size=PATCH, overlap=OVERLAP, checkpoint_dir=str(tmp_path), p=1)


# ------------------------------------------------------------------------------ accuracy and border neurons


@pytest.fixture(scope="module")
def planted():
    return planted_movie()


@pytest.fixture(scope="module")
def whole(planted):
    from jaxcnmf.fit import fit

    return fit(planted[0], RADIUS, fps=FPS)


@pytest.fixture(scope="module")
def patched(planted):
    return fit_patches(planted[0], RADIUS, fps=FPS, patch_size=PATCH, overlap=OVERLAP)


def test_patch_fit_as_accurate_as_whole_field(planted, whole, patched):
    from jaxcnmf.metrics import score_result

    truth = planted[1]
    s_whole = score_result(whole, truth)
    s_patch = score_result(patched, truth)
    assert s_patch["f1"] >= s_whole["f1"] - 0.01
    assert s_patch["calcium_corr_median"] >= s_whole["calcium_corr_median"] - 0.01
    assert s_patch["f1"] >= 0.9 and s_patch["calcium_corr_median"] >= 0.9
    assert patched.params["n_patches"] == 4 and patched.A.shape[1:] == planted[0].shape[1:]


def test_border_neurons_neither_duplicated_nor_split(planted, whole, patched):
    truth_A = planted[1]["A"]
    A, A_whole = np.asarray(patched.A), np.asarray(whole.A)
    acc = np.asarray(patched.accepted)
    split = 24  # patch starts 0 and 16 (centres 15.5 and 31.5): ownership changes at row / column 24

    def sides(a):  # fraction of a footprint's mass above / left of the split lines
        return np.array([a[:split].sum(), a[:, :split].sum()]) / a.sum()

    for k in range(N_BORDER):
        assert CENTRES[k][0] == split or CENTRES[k][1] == split
        near = np.flatnonzero(np.hypot(*(np.asarray(patched.centers) - np.asarray(CENTRES[k], float)).T) < 2 * RADIUS)
        assert len(near) == 1, (f"border neuron {k} at {CENTRES[k]}: {len(near)} components nearby (want 1): centres "
                                f"{np.asarray(patched.centers)[near].tolist()}, accepted {acc[near].tolist()}")
        j = near[0]
        assert acc[j]
        # whole, not cut at the border: the same footprint as the whole-field fit's, with the truth's mass on each side
        jw = np.argmin(np.hypot(*(np.asarray(whole.centers) - np.asarray(CENTRES[k], float)).T))
        corr = np.corrcoef(A[j].ravel(), A_whole[jw].ravel())[0, 1]
        assert corr > 0.98, f"border neuron {k}: footprint correlation with the whole-field fit {corr:.3f}"
        np.testing.assert_allclose(sides(A[j]), sides(truth_A[k]), atol=0.1)
    # and no component anywhere is a second copy of another (overlapping and correlated)
    Af = A.reshape(len(A), -1)
    Cn = np.asarray(patched.C) - np.asarray(patched.C).mean(1, keepdims=True)
    Cn /= np.linalg.norm(Cn, axis=1, keepdims=True) + 1e-12
    dup = ((Af > 0).astype(float) @ (Af > 0).T.astype(float) > 0) & (Cn @ Cn.T > 0.85)
    np.fill_diagonal(dup, False)
    assert not dup.any()
