"""Throughput of jaxcnmf.deconvolve_batch vs OASIS (oasis-deconv) on noise-constrained deconvolution with a baseline.

Simulated AR(1) and AR(2) calcium traces (sparse exponential spikes, baseline 1, white noise sn = 0.3), both solvers
given the true g and sn. OASIS: `oasis.functions.deconvolve(y, g, sn, penalty=1, optimize_g=0)` in a Python loop over
the same traces, same run (one process, as its documentation runs it), and the same loop split over --procs worker
processes (as a user could do by hand). jaxcnmf splits its batch over the cores with threads (`deconvolve_batch`'s
`threads`). Each of the three is timed --repeats times, in turn (jaxcnmf, OASIS, OASIS on processes, then again),
and the median time of each is reported: single runs on this shared 2-core VM moved OASIS's two-process rate
between 660 and 807 traces/s from one run to the next. Prints traces/s of each and the ratio (jaxcnmf / OASIS), plus
a batch-scaling curve for
jaxcnmf (traces/s vs number of traces, at fewer frames per trace), and appends rows to experiments/RESULTS.md.

    python experiments/bench_deconv_speed.py            # 2,000 x 10,000 frames; curve 1..10,000 traces x 1,000 frames
    python experiments/bench_deconv_speed.py --quick    # small sizes, a minute or so
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import scipy.signal

from jaxcnmf import deconv
from jaxcnmf.deconv import deconvolve_batch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "RESULTS.md"
MACHINE = "2-core CPU (this dev box), no GPU"
KERNELS = {"AR(1)": (0.95,), "AR(2)": (1.6, -0.63)}
SN = 0.3


def simulate(rng, n: int, T: int, g) -> np.ndarray:
    """n float32 traces of T frames: AR(g) calcium from sparse spikes + baseline 1 + noise SN."""
    s = (rng.random((n, T)) < 0.02) * rng.exponential(1.0, (n, T))
    c = scipy.signal.lfilter([1.0], np.concatenate([[1.0], -np.asarray(g)]), s, axis=1)
    return (c + 1.0 + SN * rng.standard_normal((n, T))).astype(np.float32)


def run_jax(Y: np.ndarray, g, chunk: int):
    """Solve all rows in chunks of `chunk` (one compiled shape); returns (seconds, spikes)."""
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(Y), chunk):
        res = deconvolve_batch(Y[i : i + chunk], np.asarray(g), SN)
        out.append(np.asarray(jax.block_until_ready(res.s)))
    return time.perf_counter() - t0, np.concatenate(out)


def run_oasis(Y: np.ndarray, g, n: int):
    """OASIS on the first n rows; returns (seconds for those n, spikes)."""
    from oasis.functions import deconvolve as oasis_deconvolve

    spikes = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for y in Y[:n]:
            spikes.append(oasis_deconvolve(y.astype(np.float64), g=g, sn=SN, penalty=1, optimize_g=0)[1])
    return time.perf_counter() - t0, np.array(spikes)


def _oasis_rows(args):
    """OASIS on a block of rows (a worker of run_oasis_parallel)."""
    Y, g = args
    return run_oasis(Y, g, len(Y))[1]


def run_oasis_parallel(Y: np.ndarray, g, n: int, procs: int):
    """OASIS on the first n rows split over `procs` worker processes (what a user could do by hand); (seconds, spikes)."""
    import multiprocessing

    blocks = np.array_split(Y[:n], procs)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per worker, no BLAS pools
        os.environ.setdefault(var, "1")
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(_oasis_rows, [(b[:2], g) for b in blocks])  # start the workers and import oasis before timing
        t0 = time.perf_counter()
        spikes = pool.map(_oasis_rows, [(b, g) for b in blocks])
        return time.perf_counter() - t0, np.concatenate(spikes)


def median_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Median over traces of the correlation of two spike trains (from frame 1: frame 0 holds OASIS's c1)."""
    cs = [np.corrcoef(x[1:], y[1:])[0, 1] for x, y in zip(a, b) if x[1:].std() > 0 and y[1:].std() > 0]
    return float(np.median(cs)) if cs else float("nan")


def record(rows: list[tuple[str, str]], command: str) -> None:
    """Append (benchmark, result) rows to RESULTS.md, creating it with a header if absent."""
    if not RESULTS.exists():
        RESULTS.write_text("| date | benchmark | machine | result | command |\n|---|---|---|---|---|\n")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as fh:
        for bench, result in rows:
            fh.write(f"| {date} | {bench} | {MACHINE} | {result} | `{command}` |\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (200 x 2,000; curve to 1,000 x 500)")
    ap.add_argument("--traces", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=1000, help="traces per deconvolve_batch call")
    ap.add_argument("--oasis-max-ar2", type=int, default=0,
                    help="time OASIS AR(2) on this many traces only and scale (0 = all)")
    ap.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)),
                    help="also time OASIS split over this many processes (default: the available cores; 1 = skip)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each solver, in turn; the median is reported")
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--note", default="", help="appended to each row (e.g. CPU contention)")
    args = ap.parse_args(argv)
    N = args.traces or (200 if args.quick else 2000)
    T = args.frames or (2000 if args.quick else 10000)
    curve_T = 500 if args.quick else 1000
    curve_N = [1, 10, 100, 1000] if args.quick else [1, 10, 100, 1000, 10000]
    note = f"; {args.note}" if args.note else ""
    rng = np.random.default_rng(0)
    rows = []
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {N} traces x {T} frames, sn={SN}")
    for name, g in KERNELS.items():
        Y = simulate(rng, N, T, g)
        chunk = min(args.chunk, N)
        t0 = time.perf_counter()
        deconvolve_batch(Y[:chunk], np.asarray(g), SN).s.block_until_ready()  # compile (and warm up)
        t_compile = time.perf_counter() - t0
        n_oasis = N if (len(g) == 1 or args.oasis_max_ar2 == 0) else min(N, args.oasis_max_ar2)
        times = {"jax": [], "oasis": [], "par": []}
        for _ in range(max(1, args.repeats)):  # in turn, so that a slow spell of the machine hits all three alike
            t, s_jax = run_jax(Y, g, chunk)
            times["jax"].append(t)
            t, s_oasis = run_oasis(Y, g, n_oasis)
            times["oasis"].append(t)
            if args.procs > 1:
                t, s_par = run_oasis_parallel(Y, g, n_oasis, args.procs)
                assert np.allclose(s_par, s_oasis)
                times["par"].append(t)
        t_jax, t_oasis = float(np.median(times["jax"])), float(np.median(times["oasis"]))
        rate_jax, rate_oasis = N / t_jax, n_oasis / t_oasis
        corr = median_corr(s_jax[:n_oasis], s_oasis)
        scaled = "" if n_oasis == N else f" (OASIS timed on {n_oasis} of them)"
        spread = lambda ts, n: "-".join(f"{n / t:.0f}" for t in (max(ts), min(ts)))  # noqa: E731
        reps = f"median of {len(times['jax'])} runs each"
        par = ""
        if args.procs > 1:
            rate_par = n_oasis / float(np.median(times["par"]))
            par = (f"; vs OASIS on {args.procs} processes {rate_par:.1f} traces/s (runs "
                   f"{spread(times['par'], n_oasis)}): **{rate_jax / rate_par:.2f}x**")
        print(f"{name}: jaxcnmf {rate_jax:8.1f} traces/s ({t_jax:.1f} s, compile {t_compile:.1f} s, "
              f"{deconv._n_blocks(chunk, None)} threads) | OASIS 1 process {rate_oasis:8.1f} traces/s{scaled} | "
              f"ratio {rate_jax / rate_oasis:.2f}x{par} | median spike corr {corr:.4f} | {reps}")
        rows.append((f"deconv speed {name} {N}x{T} constrained+baseline",
                     f"jaxcnmf {rate_jax:.1f} traces/s ({deconv._n_blocks(chunk, None)} threads; runs "
                     f"{spread(times['jax'], N)}) vs OASIS 1 process {rate_oasis:.1f} traces/s (runs "
                     f"{spread(times['oasis'], n_oasis)}){scaled}: **{rate_jax / rate_oasis:.2f}x**{par}; {reps}; "
                     f"median spike corr {corr:.3f}; compile {t_compile:.0f} s{note}"))
    if not args.no_curve:
        g = KERNELS["AR(1)"]
        pts = []
        for n in curve_N:
            Y = simulate(rng, n, curve_T, g)
            deconvolve_batch(Y, np.asarray(g), SN).s.block_until_ready()
            t, _ = run_jax(Y, g, n)
            pts.append(f"{n}: {n / t:.0f}")
            print(f"curve AR(1) {n:6d} traces x {curve_T} frames: {n / t:10.1f} traces/s")
        rows.append((f"deconv batch scaling AR(1), {curve_T} frames", "traces/s by batch size: " + ", ".join(pts) + note))
    if not args.no_record:
        record(rows, "python experiments/" + Path(__file__).name + " " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
