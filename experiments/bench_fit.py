"""Benchmark of the full CNMF fit: accuracy on simulated and real movies, time and peak memory vs movie size, and
suite2p on the same movies in the same run where it is importable (printed as ratios).

Run from the repository root (suite2p lives in a separate venv that also sees the system packages):

    /work/venv-bench/bin/python experiments/bench_fit.py            # full run (several minutes)
    /work/venv-bench/bin/python experiments/bench_fit.py --quick    # small sizes, for a smoke test

Parts (select with --parts): `sim` accuracy on a simulated movie (256x256x3000, 150 neurons, overlapping pairs,
neuropil, AR(2), peak SNR 4 by default); `real` precision/recall/F1 on ../shared/data/neurofinder_tr with a summary
figure under experiments/out/; `scale` time and peak resident memory on 3 pixel sizes x 3 frame counts, each measured
in a fresh subprocess (cold: with compilation; warm: a second fit of the same movie in that process), with the fitted
exponents of warm time vs pixels and vs frames. Appends one row per part to experiments/RESULTS.md.

`fit` keeps compiled programs in a persistent cache (`JAXCNMF_CACHE_DIR`, default ~/.cache/jaxcnmf/xla), so a
"cold" first fit compiles only what earlier runs did not leave there; each row says what the cache held. For a
first-ever run, point it at an empty folder: `JAXCNMF_CACHE_DIR=$(mktemp -d) python experiments/bench_fit.py ...`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "experiments", "out")
RESULTS = os.path.join(ROOT, "experiments", "RESULTS.md")
REAL = os.path.join(ROOT, "..", "shared", "data", "neurofinder_tr")
MACHINE = "2-core CPU (this dev box), no GPU"


def have_suite2p() -> bool:
    """True when a suite2p with the 1.x API (`default_settings`, `default_db`, `run_s2p`) is importable."""
    try:
        import suite2p

        return all(hasattr(suite2p, n) for n in ("default_settings", "default_db", "run_s2p"))
    except Exception:
        return False


def append_row(benchmark: str, result: str, command: str) -> None:
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a") as fh:
        if new:
            fh.write("| date | benchmark | machine | result | command |\n|---|---|---|---|---|\n")
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        fh.write(f"| {date} | {benchmark} | {MACHINE}; {load_note()} | {result} | `{command}` |\n")


def load_note() -> str:
    la = os.getloadavg()[0]
    return f"load avg {la:.1f} at the end (CPU shared with other jobs: timings noisy)" if la > 1.5 else \
        f"load avg {la:.1f}"


def cache_note() -> str:
    """What the persistent XLA compilation cache that `fit` turns on holds before the fit (a first fit in a process
    compiles only what is not there)."""
    from jaxcnmf._cache import default_cache_dir

    folder = default_cache_dir()
    if not folder:
        return "persistent compilation cache off"
    n = len(os.listdir(folder)) if os.path.isdir(folder) else 0
    return f"persistent compilation cache {'empty' if n == 0 else f'holding {n} programs'} before it"


# ----------------------------------------------------------------------------------------------------------------------
# suite2p on a movie


def suite2p_masks(movie: np.ndarray, fps: float, radius: float, workdir: str) -> tuple[np.ndarray, np.ndarray, float]:
    """`run_suite2p` restricted to the ROIs suite2p's classifier calls cells: `(masks, F, seconds)`."""
    masks, iscell, F, secs = run_suite2p(movie, fps, radius, workdir)
    return masks[iscell], F[iscell], secs


def run_suite2p(movie: np.ndarray, fps: float, radius: float, workdir: str):
    """Run suite2p 1.x on a `(T, H, W)` movie written to a TIFF under `workdir`: registration off, GPU off (torch on
    CPU), its default cell detection (sparsery) and classifier, with `diameter = 2 * radius`, `fs = fps`.

    **Arguments:** `movie` (T, H, W); `fps` frame rate (Hz); `radius` neuron radius (px); `workdir` an empty folder.

    **Returns:** `(masks (N, H, W) bool of all ROIs, iscell (N,) bool (suite2p's classifier), F (N, T)
    neuropil-corrected fluorescence F - 0.7 Fneu, seconds)`; the seconds cover `run_s2p` (TIFF -> binary conversion included, TIFF writing not).
    """
    import suite2p
    import tifffile

    T, H, W = movie.shape
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    tifffile.imwrite(os.path.join(data, "movie.tif"), movie.astype(np.float32))
    settings = suite2p.default_settings()
    d = float(2 * radius)
    settings.update(torch_device="cpu", fs=float(fps), tau=0.5, diameter=[d, d])
    settings["run"].update(do_registration=0, do_regmetrics=False, do_detection=True, do_deconvolution=True)
    settings["io"].update(delete_bin=True, move_bin=False, save_mat=False, save_NWB=False)
    db = suite2p.default_db()
    db.update(data_path=[data], file_list=["movie.tif"], input_format="tif", nplanes=1, nchannels=1,
              save_path0=workdir, fast_disk=workdir, keep_movie_raw=False)
    t0 = time.perf_counter()
    suite2p.run_s2p(db=db, settings=settings)
    secs = time.perf_counter() - t0
    plane = os.path.join(workdir, db["save_folder"], "plane0")
    stat = np.load(os.path.join(plane, "stat.npy"), allow_pickle=True)
    iscell = np.load(os.path.join(plane, "iscell.npy"))[:, 0].astype(bool)
    F = np.load(os.path.join(plane, "F.npy"))
    Fneu = np.load(os.path.join(plane, "Fneu.npy"))
    masks = np.zeros((len(stat), H, W), bool)
    for i, s in enumerate(stat):
        masks[i, s["ypix"], s["xpix"]] = True
    return masks, iscell, F - 0.7 * Fneu, secs


# ----------------------------------------------------------------------------------------------------------------------
# parts


def part_sim(args) -> dict:
    """Accuracy and time of jaxcnmf and (where importable) suite2p on one simulated movie, in the same process.
    suite2p runs first so that its numbers are printed even if the jaxcnmf fit is stopped."""
    from jaxcnmf.fit import fit
    from jaxcnmf.metrics import match_footprints, score_result, trace_correlations
    from jaxcnmf.sim import simulate

    H, T, n = (96, 1000, 30) if args.quick else (256, 3000, 150)
    H, T, n = args.sim_side or H, args.sim_frames or T, args.sim_neurons or n
    movie, truth = simulate(seed=0, shape=(H, H), n_frames=T, n_neurons=n, overlap=0.3, peak_snr=args.snr,
                            neuropil=0.3, tau_rise=0.05)
    radius = float(truth.params["radius"])
    s2p = None
    if have_suite2p():
        import suite2p

        with tempfile.TemporaryDirectory() as tmp:
            masks_all, iscell, F_all, t_s2p = run_suite2p(movie, truth.fps, radius, tmp)
        masks, F = masks_all[iscell], F_all[iscell]
        m = match_footprints(masks, truth.A)
        m_all = match_footprints(masks_all, truth.A)
        corr = float(np.nanmedian(trace_correlations(F, truth.C, m.pairs))) if len(m.pairs) else float("nan")
        s2p = dict(f1=m.f1, precision=m.precision, recall=m.recall, n_est=m.n_est, calcium=corr, seconds=t_s2p,
                   all_rois=dict(n=m_all.n_est, f1=m_all.f1, precision=m_all.precision, recall=m_all.recall))
        print("suite2p sim:", json.dumps(s2p), flush=True)
        s2p_text = (f"suite2p {suite2p.version} (registration off, torch on CPU, default sparsery detection + "
                    f"classifier, diameter {2 * radius:g} px, tau 0.5 s) F1 {m.f1:.3f} (P {m.precision:.3f} "
                    f"R {m.recall:.3f}, {m.n_est} cells; all {m_all.n_est} ROIs before its classifier: F1 "
                    f"{m_all.f1:.3f} P {m_all.precision:.3f} R {m_all.recall:.3f}), median corr of F-0.7Fneu with "
                    f"true calcium {corr:.3f}, {t_s2p:.1f} s (run_s2p incl. TIFF->binary)")
    cache = cache_note()
    t0 = time.perf_counter()
    res = fit(movie, radius, fps=truth.fps, progress=True, temporal_groups=args.temporal_groups)
    t_fit = time.perf_counter() - t0
    s = score_result(res, truth=truth, fps=truth.fps)
    row = dict(shape=f"{H}x{H}x{T}", n_true=s["n_true"], n_est=s["n_est"], precision=s["precision"],
               recall=s["recall"], f1=s["f1"], calcium=s["calcium_corr_median"], spike=s["spike_corr_median"],
               seconds=t_fit)
    print("jaxcnmf sim:", json.dumps(row), flush=True)
    result = (f"{H}x{H}x{T}, {n} neurons, overlap 0.3, neuropil 0.3, AR(2), peak SNR {args.snr}: "
              f"jaxcnmf{_order(args)} F1 "
              f"{s['f1']:.3f} (P {s['precision']:.3f} R {s['recall']:.3f}, {s['n_est']} components), median calcium "
              f"corr {s['calcium_corr_median']:.3f}, median spike corr (40 ms) {s['spike_corr_median']:.3f}, fit "
              f"{t_fit:.1f} s incl. JIT compilation (first fit in this process; {cache})")
    if s2p is not None:
        row.update({f"s2p_{k}": v for k, v in s2p.items()})
        ratio = t_fit / s2p["seconds"]
        print(f"time ratio jaxcnmf/suite2p: {ratio:.2f}")
        result += f"; {s2p_text}; time ratio jaxcnmf/suite2p {ratio:.2f}"
    else:
        result += "; suite2p not importable in this environment (not compared)"
    if not args.no_record:
        append_row("fit accuracy, simulated", result, cmdline(args))
    return row


def part_real(args) -> dict:
    from jaxcnmf.cli.demo import summary_figure
    from jaxcnmf.plot import local_correlation_image
    from jaxcnmf.fit import fit
    from jaxcnmf.io import load_movie
    from jaxcnmf.metrics import active_regions, load_regions, match_footprints

    path = os.path.join(REAL, "movie.tif")
    if not os.path.exists(path):
        print("real data not available:", path)
        return {}
    movie = load_movie(path)
    fps = 7.0
    radius = args.real_radius
    t0 = time.perf_counter()
    res = fit(movie, radius, fps=fps, progress=True, temporal_groups=args.temporal_groups)
    t_fit = time.perf_counter() - t0
    regions = load_regions(os.path.join(REAL, "regions.json"), movie.shape[1:])
    acc = np.asarray(res.accepted, bool)
    m = match_footprints(np.asarray(res.A)[acc], regions)
    m_all = match_footprints(np.asarray(res.A), regions)
    ci = local_correlation_image(movie)
    active = active_regions(regions, ci)  # labels with activity in these 600 frames (the rest are silent)

    def recall_active(match):
        return float(np.isin(np.flatnonzero(active), match.pairs[:, 1]).mean()) if active.any() else float("nan")

    os.makedirs(OUT, exist_ok=True)
    fig = os.path.join(OUT, "fit_neurofinder.png")
    summary_figure(fig, ci, np.asarray(res.A), regions.astype(np.float32), accepted=acc,
                   title=f"neurofinder_tr: {acc.sum()} accepted of {res.n_components}; F1 {m.f1:.2f} "
                         f"(P {m.precision:.2f}, R {m.recall:.2f}) vs {regions.shape[0]} labels")
    row = dict(n_labels=int(regions.shape[0]), n_accepted=int(acc.sum()), n_all=res.n_components,
               precision=m.precision, recall=m.recall, f1=m.f1, f1_all=m_all.f1, recall_all=m_all.recall,
               n_active_labels=int(active.sum()), recall_active=recall_active(m), seconds=t_fit, figure=fig)
    print("jaxcnmf real:", json.dumps(row))
    result = (f"neurofinder_tr 256x256x600, radius {radius} px, fps 7{_order(args)}: {acc.sum()} accepted of "
              f"{res.n_components}; "
              f"vs {regions.shape[0]} labels P {m.precision:.3f} R {m.recall:.3f} F1 {m.f1:.3f} (all components: "
              f"P {m_all.precision:.3f} R {m_all.recall:.3f} F1 {m_all.f1:.3f}); recall of the {int(active.sum())} "
              f"labels active in these frames (`metrics.active_regions`) {recall_active(m):.3f}; {t_fit:.1f} s incl. "
              f"compile; figure experiments/out/fit_neurofinder.png")
    if have_suite2p():
        with tempfile.TemporaryDirectory() as tmp:
            masks_all, iscell, _, t_s2p = run_suite2p(movie, fps, radius, tmp)
        ms = match_footprints(masks_all[iscell], regions)
        ms_all = match_footprints(masks_all, regions)
        row.update(s2p_f1=ms.f1, s2p_precision=ms.precision, s2p_recall=ms.recall, s2p_seconds=t_s2p,
                   s2p_recall_active=recall_active(ms), s2p_recall_active_all=recall_active(ms_all),
                   s2p_all_rois=dict(n=ms_all.n_est, f1=ms_all.f1, precision=ms_all.precision, recall=ms_all.recall))
        result += (f"; suite2p {int(iscell.sum())} cells P {ms.precision:.3f} R {ms.recall:.3f} F1 {ms.f1:.3f} "
                   f"(all {ms_all.n_est} ROIs before its classifier: P {ms_all.precision:.3f} R {ms_all.recall:.3f} "
                   f"F1 {ms_all.f1:.3f}; recall of the active labels {recall_active(ms):.3f}, all ROIs "
                   f"{recall_active(ms_all):.3f}) in {t_s2p:.1f} s")
    else:
        result += "; suite2p not importable (not compared)"
    if not args.no_record:
        append_row("fit accuracy, real (NeuroFinder labels)", result, cmdline(args))
    return row


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MB.

    Read from /proc/self/status (VmHWM) where there is one: on Linux, ru_maxrss is carried from the parent through
    fork and exec, so a worker started by a process that once held a large movie reports the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(tool: str, H: int, T: int, n: int, groups: str = "disjoint") -> dict:
    """One scaling measurement in this (fresh) process: cold and warm fit time and peak RSS."""
    from jaxcnmf.sim import simulate

    movie, truth = simulate(seed=0, shape=(H, H), n_frames=T, n_neurons=n, overlap=0.2, peak_snr=4.0)
    rss_movie = peak_rss_mb()
    radius = float(truth.params["radius"])
    out = dict(tool=tool, H=H, T=T, n=n, rss_after_sim_mb=rss_movie)
    if tool == "jaxcnmf":
        from jaxcnmf.fit import fit

        t0 = time.perf_counter()
        res = fit(movie, radius, fps=truth.fps, temporal_groups=groups)
        out["cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = fit(movie, radius, fps=truth.fps)
        out["warm_s"] = time.perf_counter() - t0
        out["K"] = res.n_components
    else:
        with tempfile.TemporaryDirectory() as tmp:
            masks, _, secs = suite2p_masks(movie, truth.fps, radius, tmp)
        out["cold_s"] = out["warm_s"] = secs
        out["K"] = int(masks.shape[0])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def part_scale(args) -> list[dict]:
    if args.quick:
        sizes, frames = (32, 48, 64), (250, 500, 1000)
    else:
        sizes, frames = (64, 128, 256), (750, 1500, 3000)
    density = 150 / 256**2  # neurons per pixel, as in the accuracy movie
    tools = ["jaxcnmf"] + (["suite2p"] if have_suite2p() and not args.no_suite2p else [])
    grid = [(H, frames[-1]) for H in sizes] + [(sizes[-1], T) for T in frames[:-1]]
    cache = cache_note()  # the workers' first fits use (and fill) the persistent compilation cache
    rows = []
    for tool in tools:
        for H, T in grid:
            n = max(3, int(round(density * H * H)))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", tool, str(H), str(T), str(n),
                   args.temporal_groups]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row))
    summary = []
    for tool in tools:
        rs = [r for r in rows if r["tool"] == tool]
        by_px = [r for r in rs if r["T"] == frames[-1]]
        by_t = [r for r in rs if r["H"] == sizes[-1]]
        e_px = np.polyfit(np.log([r["H"] ** 2 for r in by_px]), np.log([r["warm_s"] for r in by_px]), 1)[0]
        e_t = np.polyfit(np.log([r["T"] for r in by_t]), np.log([r["warm_s"] for r in by_t]), 1)[0]
        cells = ", ".join(f"{r['H']}x{r['H']}x{r['T']}: {r['warm_s']:.1f} s warm / {r['cold_s']:.1f} s cold, "
                          f"{r['peak_rss_mb']:.0f} MB" for r in sorted(rs, key=lambda r: (r["H"], r["T"])))
        name = tool + (_order(args) if tool == "jaxcnmf" else "")
        summary.append(f"{name}: exponent vs pixels {e_px:.2f}, vs frames {e_t:.2f}; {cells}")
        print(summary[-1])
    if "suite2p" in tools:
        big = [r for r in rows if r["H"] == sizes[-1] and r["T"] == frames[-1]]
        j = [r for r in big if r["tool"] == "jaxcnmf"]
        s = [r for r in big if r["tool"] == "suite2p"]
        if j and s:
            summary.append(f"ratio suite2p/jaxcnmf time at {sizes[-1]}x{sizes[-1]}x{frames[-1]}: warm "
                           f"{s[0]['warm_s'] / j[0]['warm_s']:.2f}, cold {s[0]['cold_s'] / j[0]['cold_s']:.2f}")
    else:
        summary.append("suite2p not importable (no comparison)")
    summary.append(f"cold = first fit in a fresh process ({cache})")
    if not args.no_record:
        append_row("fit time & peak memory vs size (peak RSS includes the in-memory movie)", "; ".join(summary),
                   cmdline(args))
    return rows


def _order(args) -> str:
    """The temporal update order in a row's text when it is not fit's default."""
    return "" if args.temporal_groups == "disjoint" else f" (temporal_groups={args.temporal_groups})"


def cmdline(args) -> str:
    exe = sys.executable if "venv-bench" in sys.executable else "python"
    return f"{exe} experiments/bench_fit.py " + " ".join(sys.argv[1:])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tool, H, T, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(worker(tool, H, T, n, *sys.argv[6:7])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--parts", default="sim,real,scale", help="comma-separated: sim, real, scale")
    ap.add_argument("--snr", type=float, default=4.0, help="peak SNR of the simulated accuracy movie")
    ap.add_argument("--real-radius", type=float, default=4.5,
                    help="neuron radius for neurofinder_tr in px (a typical cell measured on the mean image)")
    ap.add_argument("--sim-side", type=int, default=None, help="side in px of the simulated movie (sim part)")
    ap.add_argument("--sim-frames", type=int, default=None, help="frames of the simulated movie (sim part)")
    ap.add_argument("--sim-neurons", type=int, default=None, help="neurons in the simulated movie (sim part)")
    ap.add_argument("--no-suite2p", action="store_true", help="skip suite2p in the scaling part")
    ap.add_argument("--no-record", action="store_true", help="do not append to experiments/RESULTS.md")
    ap.add_argument("--temporal-groups", choices=("disjoint", "all"), default="disjoint",
                    help="jaxcnmf's temporal update order (fit's temporal_groups; default disjoint, fit's default)")
    args = ap.parse_args()
    print("suite2p importable:", have_suite2p())
    parts = args.parts.split(",")
    if "sim" in parts:
        part_sim(args)
    if "real" in parts:
        part_real(args)
    if "scale" in parts:
        part_scale(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
