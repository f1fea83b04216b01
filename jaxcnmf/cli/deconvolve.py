"""`jaxcnmf deconvolve`: infer spikes from fluorescence traces made by any pipeline (.npy or .csv), write an .npz.

A thin layer over `jaxcnmf.noise` (sn, g per trace) and `jaxcnmf.deconv.deconvolve_batch` (one batched solve).

Input layouts. `.npy`: a 1-D array is one trace, a 2-D array holds one trace per row. `.csv`: a first row that is not
all numbers, or is exactly the column numbers 0..n-1 or 1..n, is a header (`--header` overrides the guess); a file with
a header holds one trace per COLUMN (the spikefinder layout), one without holds one trace per ROW (`--layout`
overrides). Empty cells are NaN. Traces of different lengths are padded with NaN at the END; NaN anywhere else is an
error naming the trace.

Output `.npz` (written atomically): `c`, `s` (N, T) NaN after each trace's length, `b`, `c1`, `sn`, `lam` (N,),
`g` (N, p), `lengths` (N,), `p`, and with `--fps`: `fps`, `tau_decay`, `tau_rise` (N,) in seconds.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ParameterError, TraceError

MIN_FRAMES = 16
"""Shortest trace that can be deconvolved (noise and kinetics are estimated from it)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "deconvolve",
        help="infer spikes from fluorescence traces (.npy or .csv), noise-constrained AR(1)/AR(2) deconvolution",
        description="Estimate each trace's noise level (PSD) and AR kinetics, then solve, for every trace at once, "
        "min sum(s) s.t. s = G c >= 0 and ||y - c - b - c1 d||^2 <= sn^2 T (or the penalised form with --lam). "
        ".npy: rows are traces. .csv: with a header row (e.g. spikefinder), columns are traces; without, rows are. "
        "Shorter traces may be padded with NaN at the end.",
    )
    p.add_argument("traces", help="traces file: .npy (1-D, or 2-D with one trace per row) or .csv")
    p.add_argument("-o", "--output", required=True, help="output .npz file")
    p.add_argument("--p", type=int, choices=(1, 2), default=2, help="AR order: 1 (decay only) or 2 (rise and decay)")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate in Hz: also report decay/rise times in seconds (needed by --tau-decay)")
    p.add_argument("--tau-decay", type=float, default=None,
                   help="fix the decay time in seconds for every trace instead of estimating the kinetics")
    p.add_argument("--tau-rise", type=float, default=None, help="fix the rise time in seconds (with --p 2)")
    p.add_argument("--lam", type=float, default=None,
                   help="sparsity penalty: solve the penalised form with this lambda instead of meeting the noise "
                   "constraint")
    p.add_argument("--s-min", type=float, default=0.0, help="minimum spike size (smaller spikes are set to 0)")
    p.add_argument("--no-baseline", action="store_true", help="fix the baseline at 0 instead of estimating it")
    p.add_argument("--free-baseline", action="store_true",
                   help="let the estimated baseline be negative (default: estimated and kept >= 0, as OASIS does)")
    p.add_argument("--layout", choices=("auto", "rows", "columns"), default="auto",
                   help="for .csv: one trace per row or per column (default: columns if there is a header)")
    p.add_argument("--header", choices=("auto", "yes", "no"), default="auto",
                   help="for .csv: whether the first row is a header (default: guess)")
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------------------------------------------------
# reading traces


def _parse_cell(value: str) -> float | None:
    v = value.strip()
    if v == "" or v.lower() in ("nan", "na"):
        return float("nan")
    try:
        return float(v)
    except ValueError:
        return None


def _is_header(row: list[str]) -> bool:
    """A first row is a header when any cell is not a number, or it is exactly the column numbers 0..n-1 or 1..n."""
    values = [_parse_cell(c) for c in row]
    if any(v is None for v in values):
        return True
    n = len(values)
    return n > 1 and (values == list(range(n)) or values == list(range(1, n + 1)))


def read_csv_traces(path: str, *, layout: str = "auto", header: str = "auto") -> tuple[np.ndarray, bool]:
    """Traces from a CSV file as an (N, T) float64 array (rows are traces), padded with NaN.

    **Arguments:**
    - `path`: the .csv file.
    - `layout`: "rows", "columns" or "auto" (columns when the file has a header, else rows).
    - `header`: "yes", "no" or "auto" (see `_is_header`).

    **Returns:** (N, T) array, and whether the file held one trace per column.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    if not rows:
        raise TraceError(f"{path}: the CSV file is empty; expected numbers, one trace per row or per column.")
    has_header = _is_header(rows[0]) if header == "auto" else header == "yes"
    body = rows[1:] if has_header else rows
    if not body:
        raise TraceError(f"{path}: the CSV file has a header but no data rows.")
    width = max(len(r) for r in body)
    table = np.full((len(body), width), np.nan)
    for i, row in enumerate(body):
        for j, cell in enumerate(row):
            v = _parse_cell(cell)
            if v is None:
                line = i + 1 + (1 if has_header else 0)
                raise TraceError(f"{path}: line {line}, field {j + 1} is {cell.strip()!r}, not a number; "
                                 "only numbers and empty/NaN cells (padding) are allowed below the header.")
            table[i, j] = v
    by_columns = layout == "columns" or (layout == "auto" and has_header)
    return (table.T if by_columns else table), by_columns


def read_traces(path: str, *, layout: str = "auto", header: str = "auto") -> tuple[np.ndarray, str]:
    """Traces from .npy or .csv as (N, T) float64 with NaN padding, and the word for one trace ("row"/"column")."""
    ext = Path(path).suffix.lower()
    if ext == ".npy":
        try:
            Y = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TraceError(f"{path}: cannot read the .npy file ({e}).") from None
        if Y.ndim == 1:
            Y = Y[None, :]
        if Y.ndim != 2 or not (np.issubdtype(Y.dtype, np.floating) or np.issubdtype(Y.dtype, np.integer)):
            raise TraceError(f"{path}: expected a 1-D or 2-D numeric array (one trace per row), got shape {Y.shape}, "
                             f"dtype {Y.dtype}.")
        return np.asarray(Y, np.float64), "row"
    if ext == ".csv":
        Y, by_columns = read_csv_traces(path, layout=layout, header=header)
        return Y, "column" if by_columns else "row"
    raise TraceError(f"{path}: unsupported file type {ext!r}; give a .npy or .csv file of traces.")


def trace_lengths(Y: np.ndarray, path: str, what: str = "row") -> np.ndarray:
    """Number of valid frames of each trace: NaN is allowed only as padding at the end.

    **Raises:** `TraceError` naming the first trace with a NaN/inf before its last finite value, an empty trace, or
    one shorter than `MIN_FRAMES`.

    **Returns:** int array (N,).
    """
    if np.isinf(Y).any():
        i = int(np.flatnonzero(np.isinf(Y).any(axis=1))[0])
        raise TraceError(f"{path}: {what} {i} contains an infinite value; fix or remove it.")
    finite = np.isfinite(Y)
    T = Y.shape[1]
    last = np.where(finite.any(axis=1), T - np.argmax(finite[:, ::-1], axis=1), 0)
    for i in range(Y.shape[0]):
        n = int(last[i])
        if n == 0:
            raise TraceError(f"{path}: {what} {i} has no finite values; remove it.")
        if not finite[i, :n].all():
            bad = np.flatnonzero(~finite[i, :n])
            raise TraceError(
                f"{path}: {what} {i} has NaN inside the trace at frame(s) {', '.join(map(str, bad[:5]))}"
                f"{' ...' if bad.size > 5 else ''}; only padding at the end is allowed. Interpolate or cut the gap."
            )
        if n < MIN_FRAMES:
            raise TraceError(f"{path}: {what} {i} has {n} frames; need at least {MIN_FRAMES} to deconvolve.")
    return last.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# running


def _check_args(args: argparse.Namespace) -> None:
    src = Path(args.traces)
    if not src.is_file():
        raise TraceError(f"traces file {str(src)!r} does not exist.")
    if src.suffix.lower() not in (".npy", ".csv"):
        raise TraceError(f"{src}: unsupported file type {src.suffix!r}; give a .npy or .csv file of traces.")
    out = Path(args.output)
    if out.suffix.lower() != ".npz":
        raise ParameterError(f"-o {args.output}: the output must be an .npz file.")
    if out.is_dir():
        raise ParameterError(f"-o {args.output}: is a folder; give a file name ending in .npz.")
    if args.fps is not None and not (np.isfinite(args.fps) and args.fps > 0):
        raise ParameterError(f"--fps {args.fps}: expected a positive frame rate in Hz.")
    if args.no_baseline and args.free_baseline:
        raise ParameterError("--no-baseline and --free-baseline contradict each other; give at most one.")
    if args.lam is not None and not (np.isfinite(args.lam) and args.lam >= 0):
        raise ParameterError(f"--lam {args.lam}: expected a non-negative number.")
    if not (np.isfinite(args.s_min) and args.s_min >= 0):
        raise ParameterError(f"--s-min {args.s_min}: expected a non-negative number.")
    if args.tau_decay is not None:
        if args.fps is None:
            raise ParameterError("--tau-decay needs --fps (the frame rate turns seconds into frames).")
        if not args.tau_decay > 0:
            raise ParameterError(f"--tau-decay {args.tau_decay}: expected a positive time in seconds.")
    if args.tau_rise is not None:
        if args.tau_decay is None:
            raise ParameterError("--tau-rise needs --tau-decay.")
        if args.p != 2:
            raise ParameterError("--tau-rise needs --p 2 (an AR(1) kernel has no rise time).")
        if not 0 <= args.tau_rise < args.tau_decay:
            raise ParameterError(f"--tau-rise {args.tau_rise}: expected 0 <= rise < decay ({args.tau_decay}).")


def kinetics(Y, lengths, p: int, *, fps=None, tau_decay=None, tau_rise=None):
    """sn (N,) and g (N, p) per trace: estimated from each trace's valid frames, or g fixed from the given times."""
    import jax.numpy as jnp

    from ..deconv import TRACE_NOISE_METHOD
    from ..noise import estimate_ar, estimate_noise, tau_to_ar

    Yj = jnp.asarray(np.nan_to_num(Y), jnp.float32)
    sn = estimate_noise(Yj, length=lengths, method=TRACE_NOISE_METHOD)
    if tau_decay is not None:
        g = jnp.broadcast_to(tau_to_ar(tau_decay, tau_rise or 0.0, fps, p=p).astype(jnp.float32), (Y.shape[0], p))
    else:
        g = estimate_ar(Yj, p, sn=sn, length=lengths)
    return np.asarray(sn), np.asarray(g)


def solve(Y, lengths, g, sn, *, p: int, baseline, lam, s_min):
    """Batched deconvolution of all traces (padding handled by `length`); returns the result with numpy fields."""
    import jax.numpy as jnp

    from ..deconv import deconvolve_batch

    Yj = jnp.asarray(np.nan_to_num(Y), jnp.float32)
    res = deconvolve_batch(Yj, jnp.asarray(g), jnp.asarray(sn), p=p, baseline=baseline, lam=lam, s_min=s_min,
                           length=jnp.asarray(lengths))
    return {k: np.asarray(getattr(res, k)) for k in ("c", "s", "b", "c1", "g", "sn", "lam")}


def run(args: argparse.Namespace) -> int:
    from ..noise import ar_to_tau

    _check_args(args)
    t0 = time.perf_counter()
    Y, what = read_traces(args.traces, layout=args.layout, header=args.header)
    lengths = trace_lengths(Y, args.traces, what)
    N, T = Y.shape
    sn, g = kinetics(Y, lengths, args.p, fps=args.fps, tau_decay=args.tau_decay, tau_rise=args.tau_rise)
    out = solve(Y, lengths, g, sn, p=args.p, baseline=baseline_option(args), lam=args.lam, s_min=args.s_min)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    for k in ("c", "s"):
        out[k] = np.where(pad, np.nan, out[k]).astype(np.float32)
    out["lengths"] = lengths
    out["p"] = np.int64(args.p)
    if args.fps is not None:
        tau_d, tau_r = ar_to_tau(out["g"], args.fps)
        out["fps"] = np.float64(args.fps)
        out["tau_decay"], out["tau_rise"] = np.asarray(tau_d), np.asarray(tau_r)
    _write_npz(args.output, out)
    print(summary(args, out, N, T, what, time.perf_counter() - t0))
    return 0


BASELINE_TEXT = {"0.0": "baseline 0", "True": "baseline estimated (either sign)", "nonneg": "baseline estimated >= 0"}


def baseline_option(args: argparse.Namespace):
    """`deconvolve_batch`'s `baseline` from --no-baseline / --free-baseline."""
    if args.no_baseline:
        return 0.0
    return True if args.free_baseline else "nonneg"


def _write_npz(path: str, arrays: dict) -> None:
    from ..io import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def summary(args, out: dict, N: int, T: int, what: str, seconds: float) -> str:
    """A few lines: what was read, the kinetics and noise found, spikes inferred, where the result went."""
    lines = [
        f"deconvolved {N} trace(s) (one per {what}) of {int(out['lengths'].min())}..{T} frames from {args.traces}, "
        f"AR({args.p}), {'penalised lam=%g' % args.lam if args.lam is not None else 'noise-constrained'}, "
        f"{BASELINE_TEXT[str(baseline_option(args))]}, in {seconds:.1f} s",
        f"noise sn: median {np.median(out['sn']):.4g} (range {out['sn'].min():.4g}..{out['sn'].max():.4g})",
    ]
    if "tau_decay" in out:
        line = f"decay time: median {np.nanmedian(out['tau_decay']):.3g} s"
        if args.p == 2:
            line += f", rise time: median {np.nanmedian(out['tau_rise']):.3g} s"
        lines.append(line + f" at {args.fps:g} Hz")
    else:
        lines.append(f"AR coefficients g: median {np.array2string(np.median(out['g'], axis=0), precision=4)}")
    lines.append(f"spikes: {np.nansum(out['s']):.4g} in total, {np.mean(np.nansum(out['s'] > 0, axis=1)):.1f} "
                 f"non-zero frames per trace on average")
    lines.append(f"written to {os.path.abspath(args.output)} (c, s, b, c1, g, sn, lam, lengths"
                 f"{', tau_decay, tau_rise' if 'tau_decay' in out else ''})")
    return "\n".join(lines)
