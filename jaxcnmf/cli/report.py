"""`jaxcnmf report`: write a self-contained HTML page (and optionally PNGs) describing a fit.

A thin layer over `jaxcnmf.report.write_report`; inputs are checked (result file, movie shape, truth) before drawing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ParameterError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML report of a fit (parameters, counts, timings, contours, traces, quality, residual)",
        description="Write one self-contained HTML page (figures embedded as PNG data URIs) with the parameters the "
        "fit used, the component counts, timings (when the result records them), footprint contours over the local "
        "correlation image, traces, per-component quality, the background and the residual. Without --movie the "
        "movie-based figures are skipped.",
    )
    p.add_argument("result", help="result file (.h5 or .npz) written by `jaxcnmf fit`")
    p.add_argument("--movie", default=None, help="the fitted movie (TIFF, folder of TIFFs, .npy, file.h5:/dataset)")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (default: RESULT_report.html)")
    p.add_argument("--png-dir", default=None, help="also write each figure as a PNG file into this folder")
    p.add_argument("--truth", default=None, help="simulator ground truth (*_truth.npz) to draw the true contours")
    p.add_argument("--n-traces", type=int, default=6, help="components shown in the trace figure (default 6)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..io import load_result, open_movie
    from ..report import write_report

    try:
        import matplotlib
    except ImportError:
        raise ParameterError("jaxcnmf report draws figures with matplotlib, which is not installed: "
                             "`pip install jaxcnmf[plot]`") from None
    matplotlib.use("Agg")
    result = load_result(args.result)
    output = args.output or str(Path(args.result).with_name(Path(args.result).stem + "_report.html"))
    if args.n_traces < 1:
        raise ParameterError(f"--n-traces {args.n_traces}: expected at least 1")
    movie = open_movie(args.movie) if args.movie else None
    truth_A = None
    if args.truth:
        from ..sim import load_truth

        truth = load_truth(args.truth)
        if tuple(truth.A.shape[1:]) != tuple(result.sn.shape):
            raise ParameterError(f"--truth {args.truth}: its field {truth.A.shape[1:]} differs from the result's "
                                 f"{result.sn.shape}")
        truth_A = truth.A
    sources = {"result": os.path.abspath(args.result)}
    if args.movie:
        sources["movie"] = os.path.abspath(args.movie)
    if args.truth:
        sources["truth"] = os.path.abspath(args.truth)
    path = write_report(output, result, movie, png_dir=args.png_dir, title=args.title, truth_A=truth_A,
                        n_traces=args.n_traces, sources=sources)
    extra = f" and PNGs in {args.png_dir}" if args.png_dir else ""
    skipped = "" if movie is not None else " (no --movie: correlation image and residual skipped)"
    print(f"wrote {path}{extra}{skipped}", file=sys.stderr)
    return 0
