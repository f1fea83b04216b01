"""Figures of a fit: summary images, footprint contours, traces, quality, background and residual.

It sits after the fit (it reads a `Result`, and the movie where a figure needs it) and feeds `report.py` and the
notebooks. matplotlib is imported only when a figure is drawn (the `plot` extra: `pip install jaxcnmf[plot]`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MovieError, ParameterError
from .result import Result

PLOT_HINT = "install matplotlib with `pip install jaxcnmf[plot]` (or `pip install matplotlib`)"
DEFAULT_CHUNK_FRAMES = 256  # frames per chunk when streaming the movie (summary images, residual)
CONTOUR_LEVEL = 0.3  # contours are drawn at this fraction of each footprint's maximum
NEIGHBOUR_OFFSETS = ((0, 1), (1, -1), (1, 0), (1, 1))  # half of the 8-neighbourhood; the other half is symmetric


# ----------------------------------------------------------------------------------------------------------- helpers


def pyplot():
    """Import `matplotlib.pyplot`, or raise an `ImportError` naming the `plot` extra.

    **Returns:** the `matplotlib.pyplot` module.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"jaxcnmf's figures need matplotlib, which is not installed: {PLOT_HINT}") from e
    return plt


def _arrays(result: Result) -> dict[str, np.ndarray]:
    if not isinstance(result, Result):
        raise ParameterError(f"result: expected a jaxcnmf Result (from fit or load_result), got "
                             f"{type(result).__name__}")
    return result.arrays()


def _fps(result: Result, fps: float | None) -> float | None:
    """The frame rate to label time axes: the argument, else the fit's `params['fps']`, else None (frames)."""
    fps = fps if fps is not None else result.params.get("fps")
    if fps is None:
        return None
    if not np.isfinite(fps) or fps <= 0:
        raise ParameterError(f"fps={fps!r}: expected a positive frame rate in Hz, or None to label frames")
    return float(fps)


def _time_axis(T: int, fps: float | None) -> tuple[np.ndarray, str]:
    if fps is None:
        return np.arange(T, dtype=float), "frame"
    return np.arange(T) / fps, "time (s)"


def _chunks(movie: Any, chunk_frames: int):
    """Iterate `(start, float32 chunk)` over a movie (array, path or MovieSource) through `io.open_movie`."""
    from .io import open_movie

    source = open_movie(movie, check=False)
    return source.shape, source.iter_chunks(chunk_frames)


def _open_checked(movie: Any, result: Result, what: str):
    """Open the movie (no data read yet) and check it has the result's `(T, H, W)`."""
    from .io import open_movie

    source = open_movie(movie, check=False)
    _check_movie_matches(source.shape, result, what)
    return source


def _check_movie_matches(shape: tuple, result: Result, what: str) -> None:
    T, H, W = result.shape
    if tuple(shape) != (T, H, W):
        raise MovieError(
            f"movie: its shape (T, H, W) = {tuple(shape)} differs from the result's {(T, H, W)}; {what} needs the "
            "movie that was fitted"
        )


def component_colors(K: int) -> np.ndarray:
    """Distinct colours for `K` components (tab10, then tab20b/tab20c, cycled), as an `(K, 4)` RGBA array.

    **Arguments:**

    - `K`: number of components.

    **Returns:** `(K, 4)` float array of RGBA colours.
    """
    import matplotlib

    cmaps = [matplotlib.colormaps[n] for n in ("tab10", "tab20b", "tab20c")]
    palette = np.concatenate([np.asarray(c(np.arange(c.N))) for c in cmaps])
    return palette[np.arange(K) % len(palette)]


# ---------------------------------------------------------------------------------------------------- summary images


def local_correlation_image(movie: Any, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> np.ndarray:
    """Each pixel's mean temporal correlation with its 8 neighbours (fewer at the border): the image to spot cells in.

    Streamed over chunks of frames with one pass: sums of each pixel and of products of neighbouring pixels are
    accumulated in float64 after subtracting the first frame (which keeps the sums well conditioned).

    **Arguments:**

    - `movie`: `(T, H, W)` array, a movie path, or an `io.MovieSource`.
    - `chunk_frames`: frames read at a time.

    **Returns:** `(H, W)` float32 image in [-1, 1]; pixels that never change get 0.
    """
    (T, H, W), chunks = _chunks(movie, chunk_frames)
    ref = None
    s1 = np.zeros((H, W))
    s2 = np.zeros((H, W))
    cross = [np.zeros((H, W)) for _ in NEIGHBOUR_OFFSETS]
    for _, chunk in chunks:
        x = chunk.astype(np.float64)
        ref = x[0].copy() if ref is None else ref
        x -= ref
        s1 += x.sum(axis=0)
        s2 += (x * x).sum(axis=0)
        for acc, (dy, dx) in zip(cross, NEIGHBOUR_OFFSETS):
            a, b = _pair_slices(H, W, dy, dx)
            acc[a] += (x[(slice(None),) + a] * x[(slice(None),) + b]).sum(axis=0)
    mean = s1 / T
    var = np.maximum(s2 / T - mean**2, 0.0)
    sd = np.sqrt(var)
    live = sd > 1e-12 * max(float(sd.max()), 1e-300)
    total = np.zeros((H, W))
    count = np.zeros((H, W))
    for acc, (dy, dx) in zip(cross, NEIGHBOUR_OFFSETS):
        a, b = _pair_slices(H, W, dy, dx)
        cov = acc[a] / T - mean[a] * mean[b]
        ok = live[a] & live[b]
        r = np.where(ok, cov / np.where(ok, sd[a] * sd[b], 1.0), 0.0)
        for idx in (a, b):  # the pair's correlation counts for both of its pixels
            total[idx] += r
            count[idx] += 1
    return np.clip(total / np.maximum(count, 1), -1.0, 1.0).astype(np.float32)


def _pair_slices(H: int, W: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices `a`, `b` such that pixel `a[i]` and `b[i]` are neighbours at offset `(dy, dx)` (dy >= 0)."""
    rows_a, rows_b = slice(0, H - dy), slice(dy, H)
    if dx >= 0:
        cols_a, cols_b = slice(0, W - dx), slice(dx, W)
    else:
        cols_a, cols_b = slice(-dx, W), slice(0, W + dx)
    return (rows_a, cols_a), (rows_b, cols_b)


def mean_image(movie: Any, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> np.ndarray:
    """The temporal mean of a movie, streamed over chunks.

    **Arguments:**

    - `movie`: `(T, H, W)` array, a movie path, or an `io.MovieSource`.
    - `chunk_frames`: frames read at a time.

    **Returns:** `(H, W)` float32 image.
    """
    (T, H, W), chunks = _chunks(movie, chunk_frames)
    total = np.zeros((H, W))
    for _, chunk in chunks:
        total += chunk.sum(axis=0, dtype=np.float64)
    return (total / max(T, 1)).astype(np.float32)


def _background_image(result: Result, background: Any, movie: Any) -> tuple[np.ndarray, str]:
    """The image under the contours and its caption."""
    H, W = result.sn.shape
    if background is None:
        background = "corr" if movie is not None else "footprints"
    if isinstance(background, str):
        if background in ("corr", "mean") and movie is None:
            raise ParameterError(f"background={background!r} needs the movie: pass movie=...")
        if background in ("corr", "mean"):
            source = _open_checked(movie, result, f"background={background!r}")
            if background == "corr":
                img, name = local_correlation_image(source), "local correlation image"
            else:
                img, name = mean_image(source), "mean image"
        elif background == "footprints":
            A = np.asarray(result.A, np.float32)
            img = (A / np.maximum(A.max(axis=(1, 2), keepdims=True), 1e-30)).max(axis=0) if len(A) else np.zeros((H, W))
            name = "footprints (each scaled to max 1)"
        else:
            raise ParameterError(f"background={background!r}: expected None, 'corr', 'mean', 'footprints' or an image")
        return np.asarray(img, np.float32), name
    img = np.asarray(background, np.float32)
    if img.shape != (H, W):
        raise ParameterError(f"background: image shape {img.shape} differs from the result's field {(H, W)}")
    return img, "image"


# -------------------------------------------------------------------------------------------------------- contours


def plot_contours(
    result: Result,
    background: Any = None,
    movie: Any = None,
    ax: Any = None,
    truth_A: Any = None,
    *,
    level: float = CONTOUR_LEVEL,
    numbers: bool = True,
    accepted_only: bool = False,
):
    """Coloured, numbered contours of every footprint over a summary image.

    Each contour is the level set at `level` times the footprint's maximum. Accepted components are solid, rejected
    ones dashed; numbers are the component index `k` in the result (so `result.C[k]` is that neuron's trace).

    **Arguments:**

    - `result`: a `Result`.
    - `background`: `None` (the local correlation image when `movie` is given, else the footprints), `"corr"`,
      `"mean"`, `"footprints"`, or an `(H, W)` image.
    - `movie`: the fitted movie (array, path or `MovieSource`), needed for `"corr"` and `"mean"`.
    - `ax`: matplotlib axes to draw into (a new figure when None).
    - `truth_A`: optional `(N, H, W)` true footprints (or masks), drawn as thin white dotted contours.
    - `level`: contour level as a fraction of each footprint's maximum, in (0, 1).
    - `numbers`: write each component's index at its centre.
    - `accepted_only`: draw only accepted components.

    **Returns:** the matplotlib `Figure`.
    """
    arr = _arrays(result)
    if not 0 < level < 1:
        raise ParameterError(f"level={level!r}: expected a fraction of the footprint maximum in (0, 1)")
    img, name = _background_image(result, background, movie)
    plt = pyplot()
    from matplotlib import patheffects

    if ax is None:
        H, W = img.shape
        fig, ax = plt.subplots(figsize=(7, 7 * H / W + 0.6))
    fig = ax.figure
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    A = arr["A"]
    accepted = arr.get("accepted", np.ones(len(A), bool)).astype(bool)
    centers = arr.get("centers")
    colors = component_colors(len(A))
    if truth_A is not None:
        for a in np.asarray(truth_A, np.float32):
            if a.max() > 0:
                ax.contour(a, levels=[level * a.max()], colors="white", linewidths=0.7, linestyles="dotted")
    n_drawn = 0
    for k, a in enumerate(A):
        if a.max() <= 0 or (accepted_only and not accepted[k]):
            continue
        ax.contour(a, levels=[level * a.max()], colors=[colors[k]], linewidths=1.2,
                   linestyles="solid" if accepted[k] else "dashed")
        n_drawn += 1
        if numbers:
            cy, cx = centers[k] if centers is not None else np.unravel_index(np.argmax(a), a.shape)
            ax.text(cx, cy, str(k), color=colors[k], fontsize=8, ha="center", va="center", fontweight="bold",
                    path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    ax.set_xticks([])
    ax.set_yticks([])
    legend = "solid: accepted, dashed: rejected" + (", white dotted: truth" if truth_A is not None else "")
    ax.set_title(f"{n_drawn} components over the {name}\n{legend}", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------------------- traces


def _default_idx(arr: dict, n: int) -> np.ndarray:
    """The first `n` accepted components (the fit orders accepted first, by decreasing SNR), else the first `n`."""
    K = len(arr["C"])
    accepted = arr.get("accepted")
    if accepted is not None and np.any(accepted):
        return np.flatnonzero(accepted)[:n]
    return np.arange(min(n, K))


def plot_traces(result: Result, idx: Any = None, fps: float | None = None, *, max_traces: int = 8):
    """Raw, denoised and deconvolved traces of selected components, one panel pair per component.

    Upper panel: the raw trace `C + YrA` (grey) and the denoised calcium `C` (colour); lower panel: the spikes `S`
    as bars (same units as `C`: the size of the calcium jump each frame, see `Result`).

    **Arguments:**

    - `result`: a `Result`.
    - `idx`: component indices to show (default: the first `max_traces` accepted components).
    - `fps`: frame rate for a time axis in seconds (default: the fit's `params['fps']`; frames when unknown).
    - `max_traces`: how many to show by default.

    **Returns:** the matplotlib `Figure`.
    """
    arr = _arrays(result)
    K, T = arr["C"].shape
    idx = _default_idx(arr, max_traces) if idx is None else np.atleast_1d(np.asarray(idx))
    if idx.size and (idx.dtype.kind not in "iu" or idx.min() < -K or idx.max() >= K):
        raise ParameterError(f"idx={idx.tolist()}: expected integer component indices in [0, {K})")
    t, xlabel = _time_axis(T, _fps(result, fps))
    plt = pyplot()
    n = max(len(idx), 1)
    height = 1.9 * n + 0.9
    fig = plt.figure(figsize=(10, height))
    grid = fig.add_gridspec(2 * n, 1, height_ratios=[3, 1] * n, hspace=0.15, top=1 - 0.45 / height,
                            bottom=0.5 / height)
    colors = component_colors(K)
    if not len(idx):
        ax = fig.add_subplot(grid[:, 0])
        ax.text(0.5, 0.5, "no components to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    first = None
    for row, k in enumerate(int(i) % K for i in idx):
        ax = fig.add_subplot(grid[2 * row, 0], sharex=first)
        first = first or ax
        sx = fig.add_subplot(grid[2 * row + 1, 0], sharex=first)
        ax.plot(t, arr["C"][k] + arr["YrA"][k], color="0.6", lw=0.6, label="raw (C + YrA)")
        ax.plot(t, arr["C"][k], color=colors[k], lw=1.1, label="denoised C")
        fired = np.flatnonzero(arr["S"][k] > 0)
        sx.vlines(t[fired], 0, arr["S"][k][fired], color=colors[k], lw=1.0)
        sx.set_ylim(bottom=0)
        ax.set_ylabel(_trace_label(arr, k), fontsize=8)
        sx.set_ylabel("S", fontsize=8)
        ax.tick_params(labelbottom=False, labelsize=7)
        sx.tick_params(labelbottom=row == n - 1, labelsize=7)
        if row == 0:
            ax.legend(loc="upper right", fontsize=7, frameon=False, ncol=2)
    sx.set_xlabel(xlabel)
    fig.suptitle("traces: raw (grey), denoised calcium C, spikes S (bars)", fontsize=10)
    return fig


def _trace_label(arr: dict, k: int) -> str:
    text = f"#{k}"
    if arr.get("snr") is not None:
        text += f"\nSNR {arr['snr'][k]:.1f}"
    if arr.get("accepted") is not None and not arr["accepted"][k]:
        text += "\nrejected"
    return text


# --------------------------------------------------------------------------------------------------------- quality


def plot_quality(result: Result, *, min_snr: float | None = None, rval_thr: float | None = None):
    """Per-component quality: trace SNR against spatial correlation `r_value`, with the acceptance thresholds.

    **Arguments:**

    - `result`: a `Result` holding `snr` and `r_value` (every `fit` result does).
    - `min_snr`, `rval_thr`: thresholds to draw (default: the fit's `params['min_snr']`, `params['rval_thr']`); the
      floors `params['snr_lowest']`, `params['rval_lowest']` are drawn dotted when the result records them.

    **Returns:** the matplotlib `Figure`.
    """
    arr = _arrays(result)
    if "snr" not in arr or "r_value" not in arr:
        raise ParameterError("result: it holds no quality metrics (snr, r_value); fit it with jaxcnmf.fit, which "
                             "computes them")
    snr, rval = arr["snr"].astype(float), arr["r_value"].astype(float)
    accepted = arr.get("accepted", np.ones(len(snr), bool)).astype(bool)
    min_snr = result.params.get("min_snr") if min_snr is None else min_snr
    rval_thr = result.params.get("rval_thr") if rval_thr is None else rval_thr
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    y = np.maximum(snr, 1e-2)  # log axis: SNR <= 0 is drawn at the floor
    ax.scatter(rval[~accepted], y[~accepted], c="0.55", s=22, marker="x", label=f"rejected ({(~accepted).sum()})")
    ax.scatter(rval[accepted], y[accepted], c="tab:green", s=22, label=f"accepted ({accepted.sum()})")
    for k in range(len(snr)):
        ax.annotate(str(k), (rval[k], y[k]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if min_snr is not None:
        ax.axhline(min_snr, color="tab:red", lw=0.8, ls="--", label=f"min_snr = {min_snr:g}")
    if rval_thr is not None:
        ax.axvline(rval_thr, color="tab:blue", lw=0.8, ls="--", label=f"rval_thr = {rval_thr:g}")
    floors = {k: result.params.get(k) for k in ("snr_lowest", "rval_lowest")}  # the rule's floors, when recorded
    if floors["snr_lowest"] is not None:
        ax.axhline(floors["snr_lowest"], color="tab:red", lw=0.8, ls=":",
                   label=f"snr_lowest = {floors['snr_lowest']:g}")
    if floors["rval_lowest"] is not None:
        ax.axvline(floors["rval_lowest"], color="tab:blue", lw=0.8, ls=":",
                   label=f"rval_lowest = {floors['rval_lowest']:g}")
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("r_value (footprint x trace vs movie correlation)")
    ax.set_ylabel("trace SNR")
    ax.set_title("component quality (numbers: component index)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------ background


def plot_background(result: Result, fps: float | None = None):
    """The background model: each background footprint `b` (image) next to its trace `f`.

    **Arguments:**

    - `result`: a `Result`.
    - `fps`: frame rate for a time axis in seconds (default: the fit's `params['fps']`).

    **Returns:** the matplotlib `Figure`.
    """
    arr = _arrays(result)
    b, f = arr["b"], arr["f"]
    nb = max(len(b), 1)
    t, xlabel = _time_axis(f.shape[1] if f.ndim == 2 else 0, _fps(result, fps))
    plt = pyplot()
    height = 2.6 * nb + 0.8
    fig = plt.figure(figsize=(10, height))
    grid = fig.add_gridspec(nb, 2, width_ratios=[1, 3], wspace=0.25, hspace=0.45, top=1 - 0.6 / height,
                            bottom=0.5 / height)
    for i in range(len(b)):
        ax = fig.add_subplot(grid[i, 0])
        im = ax.imshow(b[i], cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"b[{i}]", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        tx = fig.add_subplot(grid[i, 1])
        tx.plot(t, f[i], color="tab:purple", lw=0.8)
        tx.set_title(f"f[{i}]", fontsize=9)
        tx.tick_params(labelsize=7)
        tx.set_xlabel(xlabel, fontsize=8)
    fig.suptitle("background: footprints b and traces f (movie ~ A C + b f)", fontsize=10)
    return fig


# -------------------------------------------------------------------------------------------------------- residual


def residual_stats(result: Result, movie: Any, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> dict[str, np.ndarray]:
    """Per-pixel statistics of the residual `R = Y - A C - b f`, streamed over chunks of frames.

    **Arguments:**

    - `result`: a `Result`.
    - `movie`: the fitted movie (array, path or `MovieSource`) of shape `result.shape`.
    - `chunk_frames`: frames read at a time.

    **Returns:** a dict of `(H, W)` float64 images: `mean` (temporal mean of R), `energy` (mean of R^2) and `ratio`
    (`energy / sn^2`; about 1 where the model explains everything but noise, above 1 where signal is left).
    """
    arr = _arrays(result)
    source = _open_checked(movie, result, "the residual")
    T, H, W = source.shape
    chunks = source.iter_chunks(chunk_frames)
    A = arr["A"].reshape(len(arr["A"]), H * W).astype(np.float64)
    b = arr["b"].reshape(len(arr["b"]), H * W).astype(np.float64)
    s1 = np.zeros(H * W)
    s2 = np.zeros(H * W)
    for start, chunk in chunks:
        n = len(chunk)
        model = arr["C"][:, start:start + n].T.astype(np.float64) @ A + arr["f"][:, start:start + n].T @ b
        r = chunk.reshape(n, H * W) - model
        s1 += r.sum(axis=0)
        s2 += (r * r).sum(axis=0)
    mean, energy = (s1 / T).reshape(H, W), (s2 / T).reshape(H, W)
    sn2 = arr["sn"].astype(np.float64) ** 2
    ratio = np.where(sn2 > 0, energy / np.where(sn2 > 0, sn2, 1.0), np.nan)
    return {"mean": mean, "energy": energy, "ratio": ratio}


def plot_residual(result: Result, movie: Any, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES):
    """What the model leaves: the mean residual image and the residual energy relative to the noise, `mean(R^2)/sn^2`.

    **Arguments:**

    - `result`: a `Result`.
    - `movie`: the fitted movie (array, path or `MovieSource`).
    - `chunk_frames`: frames read at a time.

    **Returns:** the matplotlib `Figure` (three panels: mean residual, energy ratio image, its histogram).
    """
    st = residual_stats(result, movie, chunk_frames=chunk_frames)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    lim = float(np.nanpercentile(np.abs(st["mean"]), 99.5)) or 1.0
    im = axes[0].imshow(st["mean"], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title("mean residual (Y - A C - b f)", fontsize=9)
    ratio = st["ratio"]
    hi = max(float(np.nanpercentile(ratio, 99.5)), 2.0) if np.isfinite(ratio).any() else 2.0
    im = axes[1].imshow(ratio, cmap="magma", vmin=0, vmax=hi, interpolation="nearest")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[1].set_title("residual energy / noise: mean(R^2) / sn^2", fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    finite = ratio[np.isfinite(ratio)]
    axes[2].hist(np.clip(finite, 0, hi), bins=50, color="tab:gray")
    axes[2].axvline(1.0, color="tab:red", lw=1, ls="--", label="1 = noise only")
    med = float(np.median(finite)) if finite.size else float("nan")
    axes[2].set_title(f"per-pixel ratio (median {med:.2f})", fontsize=9)
    axes[2].set_xlabel("mean(R^2) / sn^2")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig
