"""A self-contained HTML report of a fit: parameters, counts, timings, a component table and every figure of `plot`.

It sits at the very end of the pipeline (`jaxcnmf report` calls it): it reads a `Result` (and the movie, for the
figures that need it) and writes one HTML file with the figures embedded as base64 PNG data URIs (optionally also PNGs).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from typing import Any, Callable, NamedTuple

import numpy as np

from .errors import ParameterError
from .result import Result

MAX_TABLE_ROWS = 300  # components listed in the table (all are in the figures)


class Figure(NamedTuple):
    """One figure of the report: a file-name-safe `name`, a `title`, a `caption` and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


# ----------------------------------------------------------------------------------------------------------- figures


def figure_png(fig, *, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it.

    **Arguments:**

    - `fig`: a matplotlib `Figure`.
    - `dpi`: resolution.

    **Returns:** the PNG file's bytes.
    """
    from .plot import pyplot

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def _figure_specs(result: Result, movie: Any, truth_A: Any, n_traces: int) -> list[tuple[str, str, str, Callable]]:
    """(name, title, caption, draw) for every figure that can be drawn from what was given."""
    from . import plot

    K = result.n_components
    specs = []
    if movie is not None:
        specs.append(("contours", "Footprints over the local correlation image",
                      f"Contour of each footprint at {plot.CONTOUR_LEVEL:g} of its maximum; numbers are component "
                      "indices (row k of C and S). Solid: accepted, dashed: rejected.",
                      lambda: plot.plot_contours(result, "corr", movie, truth_A=truth_A)))
        specs.append(("contours_mean", "Footprints over the mean image", "The same contours over the temporal mean.",
                      lambda: plot.plot_contours(result, "mean", movie, truth_A=truth_A, numbers=False)))
    else:
        specs.append(("contours", "Footprints", f"Contour of each footprint at {plot.CONTOUR_LEVEL:g} of its maximum "
                      "over the footprints themselves (no movie given). Solid: accepted, dashed: rejected.",
                      lambda: plot.plot_contours(result, "footprints", truth_A=truth_A)))
    if K:
        specs.append(("traces", "Traces", f"Up to {n_traces} accepted components (the fit orders them by SNR): raw "
                      "trace C + YrA (grey), denoised calcium C, spikes S (bars, same units as C).",
                      lambda: plot.plot_traces(result, max_traces=n_traces)))
    if result.snr is not None and result.r_value is not None:
        specs.append(("quality", "Component quality", "Trace SNR against the spatial correlation r_value, with the "
                      "acceptance thresholds of the fit.", lambda: plot.plot_quality(result)))
    specs.append(("background", "Background", "Background footprints b and traces f.",
                  lambda: plot.plot_background(result)))
    if movie is not None:
        specs.append(("residual", "Residual", "What the model leaves: the mean of Y - A C - b f, and its energy "
                      "relative to the noise (about 1 where only noise is left).",
                      lambda: plot.plot_residual(result, movie)))
    return specs


def report_figures(result: Result, movie: Any = None, *, truth_A: Any = None, n_traces: int = 6,
                   dpi: int = 100) -> list[Figure]:
    """Draw every figure of the report as PNG bytes.

    **Arguments:**

    - `result`: a `Result`.
    - `movie`: the fitted movie (array, path or `MovieSource`) or None (movie-based figures are skipped).
    - `truth_A`: optional `(N, H, W)` true footprints drawn with the contours.
    - `n_traces`: how many components the trace figure shows.
    - `dpi`: PNG resolution.

    **Returns:** a list of `Figure`.
    """
    return [Figure(name, title, caption, figure_png(draw(), dpi=dpi))
            for name, title, caption, draw in _figure_specs(result, movie, truth_A, n_traces)]


# -------------------------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee;
text-align: left; } th { background: #f5f5f5; } .num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; } .note { background: #fff8e1; padding: 0.5em 1em; border-left: 3px solid
#f0b400; } .muted { color: #777; } .scroll { max-height: 420px; overflow-y: auto; display: inline-block; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _rows(pairs, numeric: bool = False) -> str:
    cls = ' class="num"' if numeric else ""
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td{cls}>{html.escape(_fmt(v))}</td></tr>" for k, v in pairs)


def summary_counts(result: Result) -> dict[str, Any]:
    """The headline numbers of a fit.

    **Arguments:**

    - `result`: a `Result`.

    **Returns:** a dict with `frames`, `height`, `width`, `components`, `accepted` (None when unknown), `rejected`,
    `background components`, `AR order p`, `fps`, `jaxcnmf version`.
    """
    T, H, W = result.shape
    K = result.n_components
    acc = None if result.accepted is None else int(np.sum(np.asarray(result.accepted)))
    return {
        "frames": T, "height": H, "width": W, "components": K, "accepted": acc,
        "rejected": None if acc is None else K - acc, "background components": int(result.b.shape[0]),
        "AR order p": int(result.g.shape[1]) if result.g.ndim == 2 else None,
        "fps": result.params.get("fps"), "jaxcnmf version": result.version or "unknown",
    }


def _timings(params: dict) -> list[tuple[str, float]]:
    timings = params.get("timings")
    if isinstance(timings, dict):
        return [(str(k), float(v)) for k, v in timings.items() if isinstance(v, (int, float))]
    return []


def _component_table(result: Result) -> str:
    arr = result.arrays()
    K = result.n_components
    cols = [("k", np.arange(K))]
    for name in ("accepted", "snr", "r_value"):
        if name in arr:
            cols.append((name, arr[name]))
    if "centers" in arr:
        cols += [("row", arr["centers"][:, 0]), ("col", arr["centers"][:, 1])]
    cols += [("max C", arr["C"].max(axis=1) if K else np.zeros(0)),
             ("spikes (frames with S > 0)", (arr["S"] > 0).sum(axis=1) if K else np.zeros(0, int))]
    head = "".join(f"<th>{html.escape(n)}</th>" for n, _ in cols)
    body = []
    for k in range(min(K, MAX_TABLE_ROWS)):
        cells = "".join(f'<td class="num">{html.escape(_fmt(v[k].item()))}</td>' for _, v in cols)
        body.append(f"<tr>{cells}</tr>")
    more = f'<p class="muted">{K - MAX_TABLE_ROWS} more components not listed.</p>' if K > MAX_TABLE_ROWS else ""
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>{more}'


def render_html(result: Result, figures: list[Figure], *, title: str = "jaxcnmf report",
                sources: dict[str, str] | None = None, notes: list[str] | None = None) -> str:
    """Assemble the report page (figures inlined as base64 PNG data URIs, no external resources).

    **Arguments:**

    - `result`: the `Result` described.
    - `figures`: the `Figure`s to embed, in order.
    - `title`: the page title.
    - `sources`: labelled input files (e.g. `{"result": path, "movie": path}`).
    - `notes`: remarks shown in a box at the top (e.g. that the movie was not given).

    **Returns:** the HTML text.
    """
    counts = summary_counts(result)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    params = {k: v for k, v in result.params.items() if k != "timings"}
    timings = _timings(result.params)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">written {stamp} by jaxcnmf. The movie is modelled as Y = A C + b f + noise: A footprints, '
        "C denoised calcium, S spikes (the calcium jump per frame, same units as C), b f background.</p>",
    ]
    for note in notes or []:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append("<h2>Summary</h2><table>" + _rows((sources or {}).items()) + _rows(counts.items(), True) + "</table>")
    parts.append("<h2>Parameters</h2>")
    parts.append(f"<table>{_rows(sorted(params.items()))}</table>" if params else
                 '<p class="muted">the result records no parameters.</p>')
    parts.append("<h2>Timings</h2>")
    if timings:
        parts.append(f"<table>{_rows([(k, f'{v:.2f} s') for k, v in timings], True)}</table>")
    else:
        parts.append('<p class="muted">the result records no timings (params["timings"]).</p>')
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f'<h2 id="{html.escape(fig.name)}">{html.escape(fig.title)}</h2><figure>'
                     f'<img src="data:image/png;base64,{data}" alt="{html.escape(fig.title)}">'
                     f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
    if result.n_components:
        parts.append("<h2>Components</h2>" + _component_table(result))
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------ writer


def write_report(path: str | os.PathLike, result: Result, movie: Any = None, *,
                 png_dir: str | os.PathLike | None = None, title: str | None = None, truth_A: Any = None,
                 n_traces: int = 6, dpi: int = 100, sources: dict[str, str] | None = None) -> str:
    """Write the HTML report of a fit (atomically), and optionally each figure as a PNG file.

    **Arguments:**

    - `path`: the HTML file to write.
    - `result`: a `Result`.
    - `movie`: the fitted movie (array, path or `MovieSource`); without it the correlation/mean images and the
      residual are skipped and the page says so. Its shape must be the result's `(T, H, W)`.
    - `png_dir`: also write `<name>.png` for every figure into this folder.
    - `title`: page title (default: "jaxcnmf report" and the result's shape).
    - `truth_A`: optional `(N, H, W)` true footprints drawn with the contours.
    - `n_traces`: how many components the trace figure shows.
    - `dpi`: PNG resolution.
    - `sources`: labelled input files listed in the summary.

    **Returns:** the path written (str).
    """
    from .io import atomic_output
    from .plot import _open_checked, pyplot

    if not isinstance(result, Result):
        raise ParameterError(f"result: expected a jaxcnmf Result (from fit or load_result), got "
                             f"{type(result).__name__}")
    if isinstance(n_traces, bool) or not isinstance(n_traces, (int, np.integer)) or n_traces < 1:
        raise ParameterError(f"n_traces={n_traces!r}: expected a positive number of components to show")
    pyplot()  # fail on a missing matplotlib before reading anything
    notes = []
    if movie is not None:
        movie = _open_checked(movie, result, "the report")  # checks the shape before any drawing
    else:
        notes.append("No movie was given: the correlation and mean images and the residual figure are skipped, and "
                     "contours are drawn over the footprints. Pass the movie (CLI: --movie) to see them.")
    T, H, W = result.shape
    title = title or f"jaxcnmf report: {result.n_components} components, {T} frames of {H}x{W}"
    figures = report_figures(result, movie, truth_A=truth_A, n_traces=n_traces, dpi=dpi)
    page = render_html(result, figures, title=title, sources=sources, notes=notes)
    if png_dir is not None:
        for fig in figures:
            with atomic_output(os.path.join(os.fspath(png_dir), f"{fig.name}.png")) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(fig.png)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(page)
    return os.fspath(path)
