"""`jaxcnmf score`: compare a fit with ground truth (simulator truth or NeuroFinder regions), print and save the scores.

A thin layer over `jaxcnmf.metrics.score_result`; the scores are written as JSON next to the result by default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

from ..errors import ParameterError, ResultFileError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a fit against ground truth (footprint F1, trace and spike correlations)",
        description="Match the result's footprints to ground truth one-to-one (Hungarian assignment on 1 - Jaccard of "
        "the binarised footprints, or on centroid distance), print precision, recall and F1 and, where both sides "
        "have traces, the correlations of calcium and of binned spikes; write them all as JSON.",
    )
    p.add_argument("result", help="result file (.h5 or .npz) written by `jaxcnmf fit`")
    truth = p.add_mutually_exclusive_group()
    truth.add_argument("--truth", help="simulator ground truth (the *_truth.npz written by `jaxcnmf simulate`)")
    truth.add_argument("--regions", help="NeuroFinder regions.json (a list of {id, coordinates: [[row, col], ...]})")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate in Hz for spike binning (default: the truth's, then the result's)")
    p.add_argument("--method", choices=("jaccard", "centroid"), default="jaccard",
                   help="matching cost: 1 - Jaccard overlap (default) or centroid distance in pixels")
    p.add_argument("--max-cost", type=float, default=None,
                   help="largest cost that is a match (default 0.7 for jaccard, i.e. Jaccard >= 0.3; for centroid the "
                   "median radius of the true footprints, in pixels)")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="a footprint's support is its pixels above this fraction of its maximum (default 0.2)")
    p.add_argument("--bin-s", type=float, default=0.04, help="spike bin width in seconds (default 0.04)")
    p.add_argument("--all-components", action="store_true",
                   help="score every component, not only those the result marks as accepted")
    p.add_argument("-o", "--output", default=None, help="JSON file for the scores (default: RESULT_scores.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..metrics import score_result

    if args.truth is None and args.regions is None:
        raise ParameterError("give the ground truth to score against: --truth movie_truth.npz (from `jaxcnmf "
                             "simulate`) or --regions regions.json (NeuroFinder)")
    result = Path(args.result)
    if not result.is_file():
        raise ResultFileError(f"result file {str(result)!r} does not exist; give a .h5 or .npz written by "
                              "`jaxcnmf fit`")
    output = Path(args.output) if args.output else result.with_name(result.stem + "_scores.json")
    if not output.parent.is_dir():
        raise ResultFileError(f"cannot write the scores to {str(output)!r}: folder {str(output.parent)!r} does not "
                              "exist; create it or choose another -o")
    scores = score_result(
        result,
        truth=args.truth,
        regions=args.regions,
        fps=args.fps,
        method=args.method,
        max_cost=args.max_cost,
        threshold=args.threshold,
        bin_s=args.bin_s,
        accepted_only=not args.all_components,
    )
    scores["result"] = str(result)
    scores["truth"] = str(args.truth or args.regions)
    print(format_table(scores))
    with _atomic_output(output) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(to_json(scores))
    print(f"scores written to {output}")
    return 0


def to_json(scores: dict) -> str:
    """Strict JSON (no NaN), one key per line with compact values, so per-pair lists stay readable."""
    lines = [f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in scores.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def format_table(scores: dict) -> str:
    """A short human-readable table of the scores (counts, precision/recall/F1, correlation summaries)."""
    rows = [
        ("ground truth", scores.get("truth", "")),
        ("matching", f"{scores['method']}, max cost {scores['max_cost']:.3g}"),
        ("estimated", str(scores["n_est"])),
        ("true", str(scores["n_true"])),
        ("matched", str(scores["matched"])),
        ("precision", f"{scores['precision']:.3f}"),
        ("recall", f"{scores['recall']:.3f}"),
        ("F1", f"{scores['f1']:.3f}"),
    ]
    for name, label in (("calcium_corr", "calcium corr"), ("spike_corr", "spike corr")):
        if name in scores:
            med, mean, nan = scores[f"{name}_median"], scores[f"{name}_mean"], scores[f"{name}_n_nan"]
            text = "n/a" if med is None else f"median {med:.3f}, mean {mean:.3f}"
            if nan:
                text += f" ({nan} constant trace{'s' if nan > 1 else ''} gave NaN)"
            rows.append((label, text))
    if "spike_corr" in scores:
        b = scores.get("spike_bin_s")
        rows.append(("spike bins", "one frame (fps unknown)" if b is None else f"{1000 * b:.0f} ms"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _atomic_output(path: Path):
    try:
        from ..io import atomic_output
    except ImportError:  # io not available: the same temporary-file-then-rename idea, locally
        return _local_atomic_output(path)
    return atomic_output(path)


@contextlib.contextmanager
def _local_atomic_output(path: Path):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
