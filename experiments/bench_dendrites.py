"""Benchmark of the fit on simulated dendritic / axonal movies: the non-somatic settings (init="dendrite",
shape-following search areas, no connected-blob clean-up) against the somatic ones (init="greedy") on the same movie.

Run from the repository root:

    python experiments/bench_dendrites.py            # 256x256x3000, 30 branching processes (several minutes)
    python experiments/bench_dendrites.py --quick    # 64x64x1000, 5 processes

Ground truth for matching: every component of the simulator's `Truth` separately (whole processes AND their
branch-local components), because each is its own rank-1 term a_k c_k of the model with its own activity; a fit that
recovers the model exactly recovers each of them (see tests/test_dendrites.py for the argument). Scores are over the
accepted components (Jaccard matching, masks at 0.2 of each footprint's max, Jaccard >= 0.3). The score restricted to
the whole processes is printed too.

Is this fair? Review (2026-11-25): (1) Matching is on footprints only, one to one, so a whole-process estimate
cannot also count as its branch (the branch mask is a part of the process mask, Jaccard = its share of the
process, and the Hungarian assignment uses each estimate once); a branch estimate whose trace still carries its
process's back-propagating events does count as found, which the median trace correlation (reported alongside)
then penalises: lenient on footprints, strict on traces. (2) The truth is demanding at the low end: the simulator
gives a branch events at half its process's rate and draws how many it gets, so at peak SNR 5 some branch-local
components have 1-2 events at a pixel peak SNR near 1 over 3000 frames; even a detector that knew the footprint and
trace would see them at a z-score ("oracle SNR", ||a|| ||c - mean|| / sn) of ~10-20, below what a search over every
position and time can separate from noise. They are kept in the score (no truth is filtered out after the fact),
and each miss is printed with its pixels, events, peak SNR and oracle SNR so the reader can see which misses are
at that limit; the RESULTS row counts the misses with <= 2 events.

Prints the ratio of times (dendrite / somatic settings), writes a figure of
estimated vs true footprints to experiments/out/dendrites.png and appends a row to experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "experiments", "out")
RESULTS = os.path.join(ROOT, "experiments", "RESULTS.md")
MACHINE = "2-core CPU (this dev box), no GPU"


def score(result, truth, sel_true=None) -> dict:
    """F1 / precision / recall and median calcium correlation of the accepted components against (part of) the truth."""
    from jaxcnmf.metrics import match_footprints, trace_correlations

    acc = np.asarray(result.accepted, bool)
    A_true, C_true = truth.A, truth.C
    if sel_true is not None:
        A_true, C_true = A_true[sel_true], C_true[sel_true]
    m = match_footprints(np.asarray(result.A)[acc], A_true)
    cc = trace_correlations(np.asarray(result.C)[acc], C_true, m.pairs)
    return dict(f1=m.f1, precision=m.precision, recall=m.recall, n_est=m.n_est, n_true=m.n_true,
                corr=float(np.nanmedian(cc)) if cc.size else float("nan"), match=m)


def describe_misses(truth, match) -> str:
    """Print each true component the fit missed (pixels, events, peak SNR, oracle SNR) and summarise them in one line.

    The oracle SNR `||a_k|| ||c_k - mean|| / sn` is the z-score of the best possible detector (footprint and trace
    known): what no method can beat. A branch with one or two events at a pixel peak SNR near 1 sits near 10 there.
    """
    from jaxcnmf.sim import peak_snr

    K = truth.A.shape[0]
    found = set(np.asarray(match.pairs)[:, 1].tolist()) if len(match.pairs) else set()
    psnr = peak_snr(truth)
    events = (truth.S > 0).sum(axis=1)
    pixels = (truth.A > 0.2 * truth.A.reshape(K, -1).max(1)[:, None, None]).reshape(K, -1).sum(1)
    sn = float(np.median(truth.sn))
    oracle = [np.linalg.norm(truth.A[k]) * np.linalg.norm(truth.C[k] - truth.C[k].mean()) / sn for k in range(K)]
    rows = []
    for k in range(K):
        if k in found:
            continue
        kind = "process" if truth.parent[k] == k else f"branch of {truth.parent[k]}"
        print(f"  missed {k:3d} ({kind}): {pixels[k]} px, {events[k]} events, peak SNR {psnr[k]:.1f}, "
              f"oracle SNR {oracle[k]:.0f}")
        rows.append((events[k], psnr[k]))
    few = sum(1 for e, _ in rows if e <= 2)
    return (f"{len(rows)} missed ({few} with <= 2 events; median peak SNR of the missed "
            f"{np.median([p for _, p in rows]) if rows else float('nan'):.1f})")


def outline_figure(path, truth, results: dict) -> None:
    """True footprints (grey) with each estimate's outline coloured: green matched, red unmatched; one panel per fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxcnmf.metrics import binarize_footprints, match_footprints

    true_img = np.max(truth.A, axis=0)
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(5 * (1 + len(results)), 5.2))
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.3, 1.0, (truth.A.shape[0], 3))
    rgb = np.zeros(true_img.shape + (3,))
    for k, a in enumerate(truth.A):
        rgb = np.maximum(rgb, a[..., None] * colours[k])
    axes[0].imshow(rgb)
    axes[0].set_title(f"truth: {truth.A.shape[0]} components (colour each)")
    for ax, (name, r) in zip(axes[1:], results.items()):
        acc = np.asarray(r.accepted, bool)
        A = np.asarray(r.A)[acc]
        m = match_footprints(A, truth.A)
        masks = binarize_footprints(A)
        ax.imshow(true_img, cmap="gray", vmax=1.0)
        matched = set(m.pairs[:, 0].tolist())
        for k, mk in enumerate(masks):
            ax.contour(mk.astype(float), levels=[0.5], colors=["lime" if k in matched else "red"], linewidths=0.8)
        found = set(m.pairs[:, 1].tolist())
        for k, mk in enumerate(binarize_footprints(truth.A)):
            if k not in found:
                ax.contour(mk.astype(float), levels=[0.5], colors=["yellow"], linewidths=0.8, linestyles="dashed")
        ax.set_title(f"{name}: F1 {m.f1:.2f} (P {m.precision:.2f}, R {m.recall:.2f})\n"
                     "green matched, red unmatched estimate,\nyellow dashed missed truth", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def append_row(benchmark: str, result: str, command: str) -> None:
    new = not os.path.exists(RESULTS)
    la = os.getloadavg()[0]
    note = f"load avg {la:.1f} (CPU shared with other helpers: timings noisy)" if la > 1.5 else f"load avg {la:.1f}"
    with open(RESULTS, "a") as fh:
        if new:
            fh.write("| date | benchmark | machine | result | command |\n|---|---|---|---|---|\n")
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        fh.write(f"| {date} | {benchmark} | {MACHINE}; {note} | {result} | `{command}` |\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64x64x1000 with 5 processes")
    ap.add_argument("--peak-snr", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-row", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)

    from jaxcnmf.fit import fit
    from jaxcnmf.sim import simulate

    if args.quick:
        sim = dict(shape=(64, 64), n_frames=1000, n_neurons=5)
    else:
        sim = dict(shape=(256, 256), n_frames=3000, n_neurons=30)
    sim.update(mode="dendrite", overlap=0.2, peak_snr=args.peak_snr)
    movie, truth = simulate(seed=args.seed, **sim)
    whole = truth.parent == np.arange(truth.parent.size)
    n_cross = int(round(0.2 * sim["n_neurons"]))
    print(f"movie {movie.shape}, {int(whole.sum())} processes + {int((~whole).sum())} branch-local components, "
          f"{n_cross} deliberate crossings, peak SNR {args.peak_snr}", flush=True)

    settings = {
        "dendrite": dict(init="dendrite", nb=2),  # width 2 px; neuropil is the second background component
        "somatic": dict(init="greedy", nb=2),
    }
    radius = {"dendrite": 2.0, "somatic": 3.0}
    results, times, scores = {}, {}, {}
    for name, kw in settings.items():
        t0 = time.perf_counter()
        r = fit(movie, radius[name], fps=truth.fps, **kw)
        times[name] = time.perf_counter() - t0
        results[name] = r
        s_all, s_proc = score(r, truth), score(r, truth, whole)
        scores[name] = (s_all, s_proc)
        print(f"{name:9s} {times[name]:7.1f} s  K={len(r.A)} accepted={int(np.sum(r.accepted))}  "
              f"all components: F1 {s_all['f1']:.3f} (P {s_all['precision']:.2f} R {s_all['recall']:.2f}) "
              f"median corr {s_all['corr']:.3f} | whole processes: recall {s_proc['recall']:.2f} "
              f"median corr {s_proc['corr']:.3f}", flush=True)
    missed = describe_misses(truth, scores["dendrite"][0]["match"])
    ratio = times["dendrite"] / times["somatic"]
    print(f"time ratio dendrite / somatic settings: {ratio:.2f}")
    fig = os.path.join(OUT, "dendrites.png")
    outline_figure(fig, truth, results)
    print("figure:", fig)
    if not args.no_row:
        (d_all, d_proc), (s_all, _) = scores["dendrite"], scores["somatic"]
        size = "x".join(str(x) for x in (*sim["shape"], sim["n_frames"]))
        res = (f"{size}, {sim['n_neurons']} processes + {int((~whole).sum())} branch components, peak SNR "
               f"{args.peak_snr}: init=dendrite F1 {d_all['f1']:.3f} (P {d_all['precision']:.2f}, R "
               f"{d_all['recall']:.2f}), median calcium corr {d_all['corr']:.3f}, whole-process recall "
               f"{d_proc['recall']:.2f}, {times['dendrite']:.0f} s; somatic settings (init=greedy) F1 "
               f"{s_all['f1']:.3f}, corr {s_all['corr']:.3f}, {times['somatic']:.0f} s; time ratio "
               f"{ratio:.2f}; init=dendrite {missed}")
        cmd = "python experiments/bench_dendrites.py" + (" --quick" if args.quick else "") + \
            (f" --peak-snr {args.peak_snr:g}" if args.peak_snr != 5.0 else "")
        append_row("dendrites: fit accuracy vs somatic settings", res, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
