"""Scores of a fit against ground truth: footprint matching (precision, recall, F1) and trace/spike correlations.

It sits after the pipeline: it reads a `Result` (or a result file) and a simulator truth file or NeuroFinder regions.

Conventions used throughout:

- Footprints are `(K, H, W)`. Float footprints are binarised per component: pixel `> threshold * max` of that
  footprint (default `threshold=0.2`, and only positive pixels); boolean masks are used as given.
- Matching is a Hungarian assignment (`scipy.optimize.linear_sum_assignment`) on a cost, `1 - Jaccard` of the masks
  (default) or the distance in pixels between centroids. Pairs whose cost exceeds `max_cost` are not matches. The
  assignment first maximises the number of accepted pairs, then minimises their total cost; every estimate is matched
  to at most one truth and every truth to at most one estimate.
- A ratio whose denominator is zero counts as perfect (nothing there to get wrong): precision is 1 with no estimates,
  recall is 1 with no true components. F1 is `2 P R / (P + R)`, and 0 when `P + R = 0`. So no estimates against some
  truth scores P = 1, R = 0, F1 = 0, and nothing against nothing scores 1, 1, 1.
- Correlations are Pearson correlations in float64; a constant trace gives NaN (reported as NaN here, and as `null` in
  JSON), and summaries use `nanmedian` / `nanmean`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse

from .errors import ParameterError, ResultFileError

DEFAULT_THRESHOLD = 0.2  # a float footprint's support: pixels above this fraction of its maximum
DEFAULT_MAX_COST_JACCARD = 0.7  # 1 - Jaccard accepted up to 0.7, i.e. Jaccard >= 0.3
DEFAULT_BIN_S = 0.04  # spike bins of 40 ms, as in the spikefinder challenge
METHODS = ("jaccard", "centroid")


class Match(NamedTuple):
    """The outcome of matching estimated footprints to true ones.

    **Fields:**

    - `pairs`: `(n, 2)` int array of matched `(est, true)` indices, sorted by `est`.
    - `costs`: `(n,)` the cost of each pair (`1 - Jaccard`, or centroid distance in pixels).
    - `precision`, `recall`, `f1`: `n / n_est`, `n / n_true` and their harmonic mean (see the module docstring for
      the values when a count is zero).
    - `n_est`, `n_true`: how many footprints were compared on each side.
    - `unmatched_est`, `unmatched_true`: sorted indices left without a partner.
    - `method`, `max_cost`: the cost used and the cut-off applied.
    """

    pairs: np.ndarray
    costs: np.ndarray
    precision: float
    recall: float
    f1: float
    n_est: int
    n_true: int
    unmatched_est: np.ndarray
    unmatched_true: np.ndarray
    method: str
    max_cost: float

    @property
    def n_matched(self) -> int:
        return int(self.pairs.shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# Footprints: masks, costs, assignment


def binarize_footprints(A: Any, threshold: float = DEFAULT_THRESHOLD, *, name: str = "A") -> np.ndarray:
    """Boolean support of each footprint.

    **Arguments:**

    - `A`: `(K, H, W)` footprints; a boolean array is returned as given.
    - `threshold`: keep pixels above `threshold` times the footprint's maximum (and above 0), in `[0, 1)`.
    - `name`: the argument's name, for error messages.

    **Returns:** `(K, H, W)` boolean masks.
    """
    A = _as_footprints(A, name)
    if A.dtype == bool:
        return A
    if not 0.0 <= threshold < 1.0:
        raise ParameterError(f"threshold={threshold!r} must be in [0, 1): the fraction of each footprint's maximum "
                             "above which a pixel belongs to it (default 0.2)")
    peak = _flat(A).max(axis=1, initial=0).astype(np.float64)
    cut = np.maximum(threshold * peak, 0.0)  # "above the fraction of the peak, and above 0", compared in float64
    # Per footprint, so no float64 copy of the whole stack is made.
    return np.stack([a > c for a, c in zip(A, cut)]) if A.shape[0] else np.zeros(A.shape, bool)


def jaccard_cost(M_est: np.ndarray, M_true: np.ndarray) -> np.ndarray:
    """`1 - Jaccard` (intersection over union) between every estimated and every true mask.

    **Arguments:**

    - `M_est`: `(K_est, H, W)` boolean masks; `M_true`: `(K_true, H, W)` boolean masks.

    **Returns:** `(K_est, K_true)` float64 costs in `[0, 1]`; two empty masks have cost 1 (they never match).
    """
    e, t = _sparse(M_est), _sparse(M_true)
    inter = (e @ t.T).toarray().astype(np.float64)
    union = np.asarray(e.sum(axis=1)).reshape(-1, 1) + np.asarray(t.sum(axis=1)).reshape(1, -1) - inter
    jac = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return 1.0 - jac


def footprint_centroids(A: Any, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Centre of mass `(row, col)` of each footprint over its binarised support.

    **Arguments:**

    - `A`: `(K, H, W)` footprints (weights are the values on the support) or boolean masks (uniform weights).
    - `threshold`: as in `binarize_footprints`.

    **Returns:** `(K, 2)` float64 centroids; NaN for an empty footprint.
    """
    A = _as_footprints(A, "A")
    k, r, c = np.nonzero(binarize_footprints(A, threshold))
    w = A[k, r, c].astype(np.float64)
    K = A.shape[0]
    total = np.bincount(k, w, minlength=K)
    rows, cols = np.bincount(k, w * r, minlength=K), np.bincount(k, w * c, minlength=K)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([rows / total, cols / total], axis=1)


def centroid_cost(cen_est: np.ndarray, cen_true: np.ndarray) -> np.ndarray:
    """Euclidean distance in pixels between every pair of centroids (`inf` where one is NaN).

    **Arguments:**

    - `cen_est`: `(K_est, 2)`; `cen_true`: `(K_true, 2)` centroids `(row, col)`.

    **Returns:** `(K_est, K_true)` float64 distances.
    """
    d = np.sqrt(((cen_est[:, None, :] - cen_true[None, :, :]) ** 2).sum(axis=-1))
    return np.where(np.isfinite(d), d, np.inf)


def assign(cost: np.ndarray, max_cost: float) -> tuple[np.ndarray, np.ndarray]:
    """Most pairs with `cost <= max_cost`, and among those the least total cost (one-to-one).

    **Arguments:**

    - `cost`: `(K_est, K_true)` costs (may hold `inf`).
    - `max_cost`: the largest accepted cost.

    **Returns:** `(pairs, costs)`: `(n, 2)` int `(est, true)` pairs sorted by `est`, and their `(n,)` costs.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    ok = cost <= max_cost
    # A rejected pair costs more than any set of accepted pairs can, so fewer rejections always wins.
    big = 1.0 + 2.0 * min(cost.shape) * max(float(np.abs(cost[ok]).max(initial=0.0)), 1.0)
    rows, cols = scipy.optimize.linear_sum_assignment(np.where(ok, cost, big))
    keep = ok[rows, cols]
    pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    return pairs, cost[rows[keep], cols[keep]]


def _ratio(num: int, den: int) -> float:
    return 1.0 if den == 0 else num / den


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def default_centroid_max_cost(M_true: np.ndarray) -> float:
    """The centroid cut-off used when none is given: the median equivalent radius `sqrt(area / pi)` of the true masks
    (at least 1 pixel), i.e. a centroid must fall within about one cell radius of the true one."""
    areas = _flat(M_true).sum(axis=1)
    areas = areas[areas > 0]
    if areas.size == 0:
        return 1.0
    return max(1.0, float(np.sqrt(np.median(areas) / np.pi)))


def match_footprints(
    A_est: Any,
    A_true: Any,
    *,
    method: str = "jaccard",
    max_cost: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Match:
    """Match estimated footprints to true ones, one-to-one, and count precision, recall and F1.

    **Arguments:**

    - `A_est`: `(K_est, H, W)` estimated footprints (float, binarised with `threshold`, or boolean masks).
    - `A_true`: `(K_true, H, W)` true footprints or masks, same `H, W`.
    - `method`: `"jaccard"` (cost `1 - |e & t| / |e | t|`) or `"centroid"` (distance in pixels between the
      centroids of the binarised footprints).
    - `max_cost`: the largest cost that still counts as a match. Default: 0.7 for `"jaccard"` (Jaccard >= 0.3);
      for `"centroid"`, the median equivalent radius `sqrt(area / pi)` of the true masks.
    - `threshold`: binarisation fraction of each float footprint's maximum (default 0.2).

    **Returns:** a `Match`.
    """
    if method not in METHODS:
        raise ParameterError(f"method={method!r} is not known; use one of {list(METHODS)}")
    M_est = binarize_footprints(A_est, threshold, name="A_est")
    M_true = binarize_footprints(A_true, threshold, name="A_true")
    if M_est.shape[1:] != M_true.shape[1:]:
        raise ParameterError(f"estimated footprints are {M_est.shape[1]}x{M_est.shape[2]} pixels but the true ones are "
                             f"{M_true.shape[1]}x{M_true.shape[2]}; score a fit against the truth of the same movie")
    if method == "jaccard":
        max_cost = DEFAULT_MAX_COST_JACCARD if max_cost is None else float(max_cost)
        cost = jaccard_cost(M_est, M_true)
    else:
        max_cost = default_centroid_max_cost(M_true) if max_cost is None else float(max_cost)
        cost = centroid_cost(footprint_centroids(A_est, threshold), footprint_centroids(A_true, threshold))
    if not (max_cost >= 0 and math.isfinite(max_cost)):
        raise ParameterError(f"max_cost={max_cost!r} must be a finite number >= 0 (the largest accepted cost)")
    pairs, costs = assign(cost, max_cost)
    n_est, n_true, n = M_est.shape[0], M_true.shape[0], pairs.shape[0]
    p, r = _ratio(n, n_est), _ratio(n, n_true)
    return Match(
        pairs=pairs,
        costs=costs,
        precision=p,
        recall=r,
        f1=_f1(p, r),
        n_est=n_est,
        n_true=n_true,
        unmatched_est=np.setdiff1d(np.arange(n_est), pairs[:, 0]),
        unmatched_true=np.setdiff1d(np.arange(n_true), pairs[:, 1]),
        method=method,
        max_cost=max_cost,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Traces: correlation and spike binning


def pearson(x: Any, y: Any) -> np.ndarray:
    """Pearson correlation along the last axis, in float64; NaN where either input is constant.

    **Arguments:**

    - `x`, `y`: arrays of the same shape `(..., T)`.

    **Returns:** `(...)` correlations.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    num = (x * y).sum(axis=-1)
    ok = den > 0
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=ok)
    return np.clip(out, -1.0, 1.0)


def _paired_traces(X_est: Any, X_true: Any, pairs: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    X_est = np.asarray(X_est)
    X_true = np.asarray(X_true)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if X_est.ndim != 2 or X_true.ndim != 2:
        raise ParameterError(f"{what} traces must be 2-D (K, T); got estimated {X_est.shape} and true {X_true.shape}")
    if X_est.shape[1] != X_true.shape[1]:
        raise ParameterError(f"estimated {what} traces have {X_est.shape[1]} frames but the true ones have "
                             f"{X_true.shape[1]}; score a fit against the truth of the same movie")
    if pairs.size and (pairs[:, 0].max() >= X_est.shape[0] or pairs[:, 1].max() >= X_true.shape[0]
                       or pairs.min() < 0):
        raise ParameterError(f"pairs index outside the {what} traces ({X_est.shape[0]} estimated, "
                             f"{X_true.shape[0]} true)")
    return X_est[pairs[:, 0]], X_true[pairs[:, 1]]


def trace_correlations(C_est: Any, C_true: Any, pairs: Any) -> np.ndarray:
    """Pearson correlation of the calcium traces of each matched pair.

    **Arguments:**

    - `C_est`: `(K_est, T)`; `C_true`: `(K_true, T)` traces.
    - `pairs`: `(n, 2)` `(est, true)` indices, e.g. `Match.pairs`.

    **Returns:** `(n,)` float64 correlations (NaN where a trace is constant).
    """
    e, t = _paired_traces(C_est, C_true, pairs, "calcium")
    return pearson(e, t)


def bin_edges(n_frames: int, fps: float, bin_s: float = DEFAULT_BIN_S) -> np.ndarray:
    """Bin index of every frame: frame `i` (at time `i / fps`) goes to bin `floor(i / (fps * bin_s))`.

    With `fps * bin_s < 1` (frames longer than a bin) every frame is its own bin: bins are never finer than frames.

    **Arguments:**

    - `n_frames`: number of frames; `fps`: frame rate in Hz; `bin_s`: bin width in seconds.

    **Returns:** `(n_frames,)` int bin index per frame, starting at 0, non-decreasing, every bin non-empty.
    """
    fps, bin_s = _check_rate(fps, bin_s)
    per_bin = max(fps * bin_s, 1.0)
    # The small tolerance keeps exact multiples (e.g. frame 6 at 30 Hz in 40 ms bins = 5.0 bins) from rounding down.
    return np.floor(np.arange(n_frames) / per_bin + 1e-9).astype(np.int64)


def bin_trace(x: Any, fps: float, bin_s: float = DEFAULT_BIN_S) -> np.ndarray:
    """Sum a trace (spike counts or amplitudes) into bins of `bin_s` seconds along the last axis.

    The last bin may be partial; sums are preserved exactly. See `bin_edges` for the frame-to-bin rule.

    **Arguments:**

    - `x`: `(..., T)` array; `fps`: frame rate in Hz; `bin_s`: bin width in seconds (default 0.04).

    **Returns:** `(..., n_bins)` float64 sums.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] == 0:
        return x
    idx = bin_edges(x.shape[-1], fps, bin_s)
    starts = np.flatnonzero(np.r_[True, np.diff(idx) > 0])
    return np.add.reduceat(x, starts, axis=-1)


def spike_correlations(
    S_est: Any, S_true: Any, pairs: Any, fps: float | None, bin_s: float = DEFAULT_BIN_S
) -> np.ndarray:
    """Pearson correlation of the binned spikes of each matched pair.

    **Arguments:**

    - `S_est`: `(K_est, T)` inferred spikes; `S_true`: `(K_true, T)` true spikes (counts or amplitudes per frame).
    - `pairs`: `(n, 2)` `(est, true)` indices.
    - `fps`: frame rate in Hz; `None` correlates frame by frame (no binning).
    - `bin_s`: bin width in seconds (default 0.04).

    **Returns:** `(n,)` float64 correlations (NaN where a binned train is constant, e.g. no spikes at all).
    """
    e, t = _paired_traces(S_est, S_true, pairs, "spike")
    if fps is not None:
        e, t = bin_trace(e, fps, bin_s), bin_trace(t, fps, bin_s)
    return pearson(e, t)


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth and results from files


def load_regions(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read NeuroFinder regions (`regions.json`) as boolean masks.

    The file is a JSON list of `{"id": ..., "coordinates": [[row, col], ...]}` (a dict with a `"regions"` list is
    accepted too), where row indexes axis 1 of the `(T, H, W)` movie and col axis 2.

    **Arguments:**

    - `path`: the JSON file.
    - `shape`: `(H, W)` of the movie the regions were drawn on.

    **Returns:** `(K, H, W)` boolean masks, in the file's order.
    """
    path = Path(path)
    H, W = _check_shape(shape)
    if not path.is_file():
        raise ResultFileError(f"regions file {str(path)!r} does not exist; give the path of a NeuroFinder "
                              "regions.json (a list of {\"id\", \"coordinates\": [[row, col], ...]})")
    try:
        with open(path, encoding="utf-8") as fh:
            regions = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultFileError(f"regions file {str(path)!r} is not readable JSON ({e}); expected a NeuroFinder "
                              "regions.json") from None
    if isinstance(regions, dict) and "regions" in regions:
        regions = regions["regions"]
    if not isinstance(regions, list):
        raise ResultFileError(f"regions file {str(path)!r} holds a {type(regions).__name__}, not a list of regions "
                              "{\"id\", \"coordinates\": [[row, col], ...]}")
    masks = np.zeros((len(regions), H, W), dtype=bool)
    for k, region in enumerate(regions):
        rc = _region_coordinates(region, k, path)
        bad = (rc[:, 0] < 0) | (rc[:, 0] >= H) | (rc[:, 1] < 0) | (rc[:, 1] >= W)
        if bad.any():
            r, c = rc[np.argmax(bad)]
            raise ResultFileError(f"regions file {str(path)!r}: region {k} (id {_region_id(region)}) has pixel "
                                  f"[{r}, {c}] outside the movie's {H}x{W} frame; check that `shape` is the movie's "
                                  "(H, W) and that coordinates are [row, col]")
        masks[k, rc[:, 0], rc[:, 1]] = True
    return masks


def active_regions(masks: Any, corr_image: Any, quantile: float = 0.9) -> np.ndarray:
    """Which labelled regions show activity in this recording: those whose mean local correlation (`corr_image`,
    e.g. `plot.local_correlation_image` of the movie) exceeds the image's `quantile`.

    Anatomical labels (NeuroFinder's) include cells that are silent in the frames at hand; no method working from
    the activity can find them, so the recall over the active regions says how much of what the data hold was
    found (on neurofinder_tr, 14 of the 54 labels pass at the default 0.9; the silent ones sit at the image's
    median).

    **Arguments:** `masks` `(K, H, W)` bool regions; `corr_image` `(H, W)`; `quantile` in (0, 1).

    **Returns:** `(K,)` bool.
    """
    masks = np.asarray(masks, bool)
    ci = np.asarray(corr_image, np.float64)
    if masks.ndim != 3 or masks.shape[1:] != ci.shape:
        raise ParameterError(f"active_regions: masks {masks.shape} and corr_image {ci.shape} do not match; need "
                         "(K, H, W) and (H, W)")
    if not 0 < quantile < 1:
        raise ParameterError(f"active_regions: quantile={quantile!r} must lie in (0, 1)")
    level = np.quantile(ci[np.isfinite(ci)], quantile)
    flat = masks.reshape(len(masks), -1)
    size = flat.sum(axis=1)
    mean = (flat @ np.nan_to_num(ci).ravel()) / np.maximum(size, 1)
    return (mean > level) & (size > 0)


def _region_id(region: Any) -> Any:
    return region.get("id", "?") if isinstance(region, dict) else "?"


def _region_coordinates(region: Any, k: int, path: Path) -> np.ndarray:
    coords = region.get("coordinates") if isinstance(region, dict) else None
    try:
        rc = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        rc = None
    if rc is None or rc.ndim != 2 or rc.shape[1] != 2 or rc.shape[0] == 0 or not np.all(rc == np.round(rc)):
        raise ResultFileError(f"regions file {str(path)!r}: region {k} (id {_region_id(region)}) needs a non-empty "
                              "\"coordinates\" list of integer [row, col] pairs")
    return rc.astype(np.int64)


def load_truth_arrays(truth: Any) -> dict[str, Any]:
    """Ground truth as a dict of numpy arrays (`A` required; `C`, `S`, `fps` when present).

    **Arguments:**

    - `truth`: a simulator truth file (`.npz`, read with numpy), a `jaxcnmf.sim.Truth`-like object with attributes,
      or a mapping.

    **Returns:** a dict with `A` `(K, H, W)` and whichever of `C`, `S`, `fps` the truth holds.
    """
    if isinstance(truth, (str, os.PathLike)):
        path = Path(truth)
        if not path.is_file():
            raise ResultFileError(f"truth file {str(path)!r} does not exist; give the `*_truth.npz` written by "
                                  "`jaxcnmf simulate`")
        try:
            with np.load(path, allow_pickle=False) as z:
                src = {k: z[k] for k in ("A", "C", "S", "fps") if k in z.files}
        except Exception as e:  # zipfile/pickle/OS errors all mean the same to the user
            raise ResultFileError(f"truth file {str(path)!r} could not be read as .npz ({e}); give the "
                                  "`*_truth.npz` written by `jaxcnmf simulate`") from None
        origin = repr(str(path))
    else:
        src, origin = truth, "truth"
    out = {k: _get(src, k) for k in ("A", "C", "S", "fps")}
    if out["A"] is None:
        raise ResultFileError(f"{origin} has no footprints `A` (K, H, W); give a simulator truth file")
    out = {k: v for k, v in out.items() if v is not None}
    if "fps" in out:
        out["fps"] = float(np.asarray(out["fps"]))
    return out


def result_arrays(result: Any) -> tuple[dict[str, Any], dict]:
    """An estimate as a dict of numpy arrays (`A` required; `C`, `S`, `accepted` when present) and its params.

    **Arguments:**

    - `result`: a result file path (read with `jaxcnmf.io.load_result`), a `Result`, or a mapping of arrays.

    **Returns:** `(arrays, params)`.
    """
    if isinstance(result, (str, os.PathLike)):
        from .io import load_result

        result = load_result(result)
    params = dict(getattr(result, "params", None) or {})
    out = {k: _get(result, k) for k in ("A", "C", "S", "accepted")}
    if out["A"] is None:
        raise ResultFileError("the result has no footprints `A` (K, H, W); give a jaxcnmf result file or Result")
    return {k: v for k, v in out.items() if v is not None}, params


def _get(src: Any, key: str) -> Any:
    value = src.get(key) if isinstance(src, Mapping) else getattr(src, key, None)
    return None if value is None else np.asarray(value)


# ----------------------------------------------------------------------------------------------------------------------
# The whole score


def score_result(
    result_or_path: Any,
    truth: Any = None,
    regions: Any = None,
    fps: float | None = None,
    *,
    method: str = "jaccard",
    max_cost: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    bin_s: float = DEFAULT_BIN_S,
    accepted_only: bool = True,
) -> dict:
    """Score a fit against ground truth: matching counts, and trace and spike correlations of matched pairs.

    **Arguments:**

    - `result_or_path`: a result file, a `Result`, or a mapping with `A` `(K, H, W)` and optionally `C`, `S`.
    - `truth`: simulator ground truth (a `*_truth.npz` path, a `Truth`, or a mapping with `A` and optionally `C`, `S`,
      `fps`). Give exactly one of `truth` and `regions`.
    - `regions`: NeuroFinder `regions.json` path (read at the result's `H, W`) or `(K, H, W)` boolean masks.
    - `fps`: frame rate for spike binning; default the truth's `fps`, then the result's `params["fps"]`; if none is
      known spikes are correlated frame by frame (`spike_bin_s` is then `null`).
    - `method`, `max_cost`, `threshold`: as in `match_footprints`.
    - `bin_s`: spike bin width in seconds (default 0.04).
    - `accepted_only`: when the result carries `accepted`, score only the accepted components (indices in `pairs`
      stay those of the full result).

    **Returns:** a JSON-able dict: `n_est`, `n_true`, `matched`, `precision`, `recall`, `f1`, `pairs`, `costs`,
    `unmatched_est`, `unmatched_true`, and when both sides have traces `calcium_corr` (per pair),
    `calcium_corr_median`, `calcium_corr_mean`, likewise `spike_corr*`. NaN is written as `None`.
    """
    if (truth is None) == (regions is None):
        raise ParameterError("give exactly one ground truth: `truth` (a simulator *_truth.npz) or `regions` "
                             "(a NeuroFinder regions.json)" + ("" if truth is None else "; got both"))
    est, params = result_arrays(result_or_path)
    A_est = _as_footprints(est["A"], "result A")
    if regions is not None:
        gt = {"A": load_regions(regions, A_est.shape[1:]) if isinstance(regions, (str, os.PathLike))
              else np.asarray(regions)}
    else:
        gt = load_truth_arrays(truth)
    keep = np.arange(A_est.shape[0])
    if accepted_only and "accepted" in est:
        acc = np.asarray(est["accepted"]).astype(bool).reshape(-1)
        if acc.shape[0] != A_est.shape[0]:
            raise ResultFileError(f"the result's `accepted` has {acc.shape[0]} entries for {A_est.shape[0]} "
                                  "components")
        keep = np.flatnonzero(acc)
    m = match_footprints(A_est[keep], gt["A"], method=method, max_cost=max_cost, threshold=threshold)
    pairs = np.stack([keep[m.pairs[:, 0]], m.pairs[:, 1]], axis=1) if m.n_matched else m.pairs
    out: dict[str, Any] = {
        "method": m.method,
        "max_cost": m.max_cost,
        "threshold": float(threshold),
        "n_components": int(A_est.shape[0]),
        "n_est": m.n_est,
        "n_true": m.n_true,
        "matched": m.n_matched,
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "pairs": pairs.tolist(),
        "costs": _json_floats(m.costs),
        "unmatched_est": keep[m.unmatched_est].tolist(),
        "unmatched_true": m.unmatched_true.tolist(),
    }
    if "C" in est and "C" in gt:
        out.update(_summary("calcium_corr", trace_correlations(est["C"], gt["C"], pairs)))
    if "S" in est and "S" in gt:
        if fps is None:
            fps = gt.get("fps", params.get("fps"))
        fps = None if fps is None else _check_rate(fps, bin_s)[0]
        out["fps"] = fps
        out["spike_bin_s"] = None if fps is None else max(bin_s, 1.0 / fps)
        out.update(_summary("spike_corr", spike_correlations(est["S"], gt["S"], pairs, fps, bin_s)))
    return out


def _summary(name: str, r: np.ndarray) -> dict:
    finite = np.isfinite(r)
    return {
        name: _json_floats(r),
        f"{name}_median": _json_float(np.median(r[finite])) if finite.any() else None,
        f"{name}_mean": _json_float(np.mean(r[finite])) if finite.any() else None,
        f"{name}_n_nan": int((~finite).sum()),
    }


def _json_float(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_floats(a: np.ndarray) -> list:
    return [_json_float(x) for x in np.asarray(a).reshape(-1)]


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks


def _sparse(M: np.ndarray) -> scipy.sparse.csr_matrix:
    """`(K, H, W)` boolean masks -> sparse `(K, H*W)` 0/1 matrix, built from the set pixels only."""
    k, i = np.nonzero(_flat(M))
    return scipy.sparse.csr_matrix((np.ones(k.size), (k, i)), shape=(M.shape[0], M.shape[1] * M.shape[2]))


def _flat(A: np.ndarray) -> np.ndarray:
    """`(K, H, W)` -> `(K, H*W)`, also for `K = 0`."""
    return A.reshape(A.shape[0], A.shape[1] * A.shape[2])


def _as_footprints(A: Any, name: str) -> np.ndarray:
    A = np.asarray(A)
    if A.ndim != 3:
        raise ParameterError(f"{name} must be footprints of shape (K, H, W); got shape {A.shape}")
    if A.dtype != bool and not np.issubdtype(A.dtype, np.number):
        raise ParameterError(f"{name} must be numeric or boolean footprints; got dtype {A.dtype}")
    return A


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        H, W = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(f"shape={shape!r} must be the movie's (H, W)") from None
    if H <= 0 or W <= 0:
        raise ParameterError(f"shape={shape!r} must be the movie's (H, W), both positive")
    return H, W


def _check_rate(fps: Any, bin_s: Any) -> tuple[float, float]:
    fps, bin_s = float(fps), float(bin_s)
    if not (math.isfinite(fps) and fps > 0):
        raise ParameterError(f"fps={fps!r} must be a positive frame rate in Hz")
    if not (math.isfinite(bin_s) and bin_s > 0):
        raise ParameterError(f"bin_s={bin_s!r} must be a positive bin width in seconds (default 0.04)")
    return fps, bin_s
