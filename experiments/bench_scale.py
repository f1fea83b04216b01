"""Scale benchmark: patch mode vs a whole-field fit (accuracy and time), an out-of-core fit of a uint16 movie on disk
(peak resident memory), time vs frames and vs pixels (fitted exponents), 1 vs 2 devices, local vs Dask.

Every section measures its peer in the same run and prints a ratio; `--append` adds one row per section to
experiments/RESULTS.md. The defaults are small (a shared 2-core box); the issue's sizes are:

    python experiments/bench_scale.py --sections accuracy --shape 512 --frames 2000
    python experiments/bench_scale.py --sections ooc --shape 512 --ooc-frames 20000 --patch 96 --memory-budget 2GB
    python experiments/bench_scale.py --sections scaling,devices,dask --frames 2000 --scale-side 128 --patch 64

Movies come from `jaxcnmf.sim`. The out-of-core movie is written block by block to a uint16 .npy (one simulated block
of `--block` frames repeated with its noise; the fit does not know), so it never exists in memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MACHINE = "2-core CPU (this dev box), no GPU"
LOAD_NOTE = ""  # set from --note (e.g. what else ran on the machine)


def _row(bench: str, result: str, command: str, append: bool) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = f" ({LOAD_NOTE})" if LOAD_NOTE else ""
    line = f"| {when} | {bench} | {MACHINE} | {result}{note} | `{command}` |"
    print(line, flush=True)
    if append:
        path = HERE / "RESULTS.md"
        if not path.exists():
            path.write_text("| date | benchmark | machine | result | command |\n|---|---|---|---|---|\n")
        with open(path, "a") as fh:
            fh.write(line + "\n")


def _sim(size: int, frames: int, seed: int = 0, radius: float = 4.0, density: float = 1 / 500, **kw):
    from jaxcnmf.sim import simulate

    n = max(4, int(size * size * density))
    return simulate(shape=(size, size), n_frames=frames, n_neurons=n, radius=radius, seed=seed, **kw)


def _score(res, truth) -> tuple[float, float]:
    from jaxcnmf.metrics import score_result

    s = score_result(res, truth)
    return float(s["f1"]), float(s["calcium_corr_median"] or float("nan"))


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def _slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# --------------------------------------------------------------------------------------------------------- sections


def accuracy(args):
    """Patch mode vs the whole-field fit of the same movie: F1, median calcium correlation, time."""
    from jaxcnmf.fit import fit
    from jaxcnmf.patches import fit_patches

    movie, truth = _sim(args.shape, args.frames, seed=1, radius=args.radius)
    whole, t_whole = _timed(fit, movie, args.radius, fps=30.0)
    patched, t_patch = _timed(fit_patches, movie, args.radius, fps=30.0, patch_size=args.patch, overlap=args.overlap,
                              progress=True)
    (f1w, cw), (f1p, cp) = _score(whole, truth), _score(patched, truth)
    res = (f"{args.shape}x{args.shape}x{args.frames}, {truth.A.shape[0]} neurons, patches {args.patch}+{args.overlap}: "
           f"patch F1 {f1p:.3f} / corr {cp:.3f} vs whole-field F1 {f1w:.3f} / corr {cw:.3f} "
           f"(diff {f1p - f1w:+.3f} / {cp - cw:+.3f}); time patch {t_patch:.0f} s vs whole {t_whole:.0f} s "
           f"(ratio {t_patch / t_whole:.2f}, both with compilation)")
    _row("scale: patch vs whole-field accuracy", res,
         f"python experiments/bench_scale.py --sections accuracy --shape {args.shape} --frames {args.frames}",
         args.append)


_OOC_CHILD = """
import json, resource, sys, threading, time
sys.path.insert(0, {here!r})
peak = {{"anon": 0}}
def watch():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
import jaxcnmf.patches as _p
def hwm():  # this process's own peak resident memory (VmHWM; ru_maxrss would include the parent's peak at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
_note = _p.ProgressBar.note
def note(self, text):  # each stage line also says the peak resident memory so far
    _note(self, text + "  [peak RSS so far %.2f GiB]" % (hwm() / 2**30))
_p.ProgressBar.note = note
from jaxcnmf.patches import fit_patches
t = time.perf_counter()
res = fit_patches({path!r}, {radius}, fps=30.0, patch_size={patch}, overlap={overlap}, memory_budget={budget!r},
                  checkpoint_dir={ck!r}, progress=True)
elapsed = time.perf_counter() - t
from jaxcnmf.io import save_result
save_result({out!r}, res)
print("RESULT" + json.dumps({{"elapsed": elapsed, "maxrss": hwm(),
                              "peak_anon": peak["anon"], "K": res.n_components}}))
"""


def out_of_core(args):
    """Fit a uint16 movie from disk in a child process and report its peak resident memory.

    The movie and the patch checkpoints live in `--workdir` when given (kept, so a rerun reuses the movie and resumes
    finished patches), else in a temporary folder.
    """
    import contextlib

    from jaxcnmf.io import load_result

    T = args.ooc_frames
    H = W = args.shape
    block, truth = _sim(args.shape, min(args.block, T), seed=2, radius=args.radius, quantize=True,
                        background_level=1000.0)
    clean = truth.noise_free()
    noise = block - clean
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(dir=args.tmp)) as tmp:
        os.makedirs(tmp, exist_ok=True)
        path = os.path.join(tmp, f"movie_{H}x{W}x{T}.npy")
        if not os.path.exists(path):
            # the block's cells and activity repeat, its noise does not: each repetition gets the noise rolled by a
            # random number of frames with a random sign (a movie whose noise repeats exactly has no power at the
            # frequencies between the repetition's harmonics, and every noise estimate fails on it)
            rng = np.random.default_rng(7)
            mm = np.lib.format.open_memmap(path + ".part.npy", mode="w+", dtype=np.uint16, shape=(T, H, W))
            L = len(block)
            for t0 in range(0, T, L):
                shift, sign = int(rng.integers(L)), np.float32(rng.choice([-1.0, 1.0]))
                for s0 in range(0, min(L, T - t0), 50):  # 50 frames at a time, float32: the parent stays small
                    s1 = min(s0 + 50, L, T - t0)
                    rolled = noise[(np.arange(s0, s1) - shift) % L] * sign
                    mm[t0 + s0:t0 + s1] = np.clip(np.round(clean[s0:s1] + rolled), 0, 65535).astype(np.uint16)
            mm.flush()
            del mm
            os.replace(path + ".part.npy", path)
        del block, clean, noise
        out = os.path.join(tmp, "result.npz")
        ck = os.path.join(tmp, f"checkpoints_{H}x{T}_p{args.patch}_{args.memory_budget}")
        code = textwrap.dedent(_OOC_CHILD.format(here=str(HERE.parent), path=path, radius=args.radius,
                                                 patch=args.patch, overlap=args.overlap, budget=args.memory_budget,
                                                 out=out, ck=ck))
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit("out-of-core child failed")
        info = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
        res = load_result(out)
        reps = -(-T // len(truth.C[0]))
        truth_long = {"A": truth.A, "C": np.tile(truth.C, reps)[:, :T], "S": np.tile(truth.S, reps)[:, :T],
                      "fps": truth.fps}
        f1, corr = _score(res, truth_long)
    gb = T * H * W * 4 / 1e9
    res_txt = (f"{H}x{W}x{T} uint16 .npy ({gb:.2f} GB as float32, {gb / 2:.2f} GB on disk), budget "
               f"{args.memory_budget}, patches {args.patch}+{args.overlap}: peak RSS {info['maxrss'] / 2**30:.2f} GiB "
               f"(anonymous {info['peak_anon'] / 2**30:.2f} GiB) = {info['maxrss'] / (gb * 1e9):.3f} x the float32 "
               f"movie; {info['elapsed']:.0f} s; K={info['K']} for {truth.A.shape[0]} neurons, F1 {f1:.3f}, "
               f"median calcium corr {corr:.3f}")
    _row("scale: out-of-core fit from disk (peak memory)", res_txt,
         f"python experiments/bench_scale.py --sections ooc --shape {H} --ooc-frames {T} --patch {args.patch} "
         f"--memory-budget {args.memory_budget}", args.append)


def scaling(args):
    """Time of `fit_patches` vs frames (T/4, T/2, T at `--scale-side` pixels square) and vs pixels (sides S/2, 3S/4,
    S, or `--scale-sides`, at T/2 frames); each timed on a second run of the same movie, so compilation is left out.
    Fields only a few patches wide cost more than their area (the last row and column of patches overlap more), so
    the pixels sweep means most with sides several patches wide."""
    from jaxcnmf.patches import fit_patches

    kw = dict(fps=30.0, patch_size=args.patch, overlap=args.overlap)

    def timed(side, T, seed):
        movie, _ = _sim(side, T, seed=seed, radius=args.radius)
        fit_patches(movie, args.radius, **kw)  # compile for this shape
        return _timed(fit_patches, movie, args.radius, **kw)[1]

    side = args.scale_side
    frames = [args.frames // 4, args.frames // 2, args.frames]
    times_t = [timed(side, T, 3) for T in frames]
    sizes = [int(x) for x in args.scale_sides.split(",")] if args.scale_sides else [side // 2, (3 * side) // 4, side]
    times_p = [timed(s, frames[1], 4) for s in sizes]
    et, ep = _slope(frames, times_t), _slope(np.square(sizes), times_p)
    res = (f"frames {frames} at {side}x{side}: {', '.join(f'{t:.1f}' for t in times_t)} s, exponent {et:.2f}; "
           f"pixels {[f'{s}x{s}' for s in sizes]} at {frames[1]} frames: {', '.join(f'{t:.1f}' for t in times_p)} s, "
           f"exponent {ep:.2f} (second runs; patches {args.patch}+{args.overlap})")
    sides = f" --scale-sides {args.scale_sides}" if args.scale_sides else ""
    _row("scale: fit_patches time vs frames and pixels", res,
         f"python experiments/bench_scale.py --sections scaling --frames {args.frames} --scale-side {side}{sides} "
         f"--patch {args.patch} --overlap {args.overlap}", args.append)


_DEV_CHILD = """
import json, sys, time
sys.path.insert(0, {here!r})
import jax
from jaxcnmf.sim import simulate
from jaxcnmf.patches import fit_patches
movie, _ = simulate(shape=({s}, {s}), n_frames={T}, n_neurons={n}, radius={r}, seed=5)
kw = dict(fps=30.0, patch_size={p}, overlap={o})
out = {{}}
for nd in (1, 2):
    fit_patches(movie, {r}, devices=nd, **kw)
    t = time.perf_counter(); res = fit_patches(movie, {r}, devices=nd, **kw); out[nd] = time.perf_counter() - t
    out["K%d" % nd] = res.n_components
print("RESULT" + json.dumps(out))
"""


def devices(args):
    """1 vs 2 devices (XLA host devices on CPU: the same 2 cores, so this shows overhead, not a speed-up)."""
    s = args.scale_side * 2
    code = textwrap.dedent(_DEV_CHILD.format(here=str(HERE.parent), s=s, T=args.frames // 4, n=max(4, s * s // 500),
                                             r=args.radius, p=args.patch, o=args.overlap))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit("devices child failed")
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    res = (f"{s}x{s}x{args.frames // 4}: 1 device {out['1']:.1f} s, 2 devices {out['2']:.1f} s "
           f"(ratio {out['1'] / out['2']:.2f}x; K {out['K1']} vs {out['K2']}); CPU host devices share the 2 cores")
    _row("scale: 1 vs 2 devices (fit_patches)", res, "python experiments/bench_scale.py --sections devices",
         args.append)


def dask_vs_local(args):
    """The same patch run on a 2-worker local Dask cluster and in this process (both compiled first)."""
    import distributed

    from jaxcnmf.patches import fit_patches

    s = args.scale_side * 2
    movie, _ = _sim(s, args.frames // 4, seed=6, radius=args.radius)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = os.path.join(tmp, "movie.npy")
        np.save(path, movie)
        kw = dict(fps=30.0, patch_size=args.patch, overlap=args.overlap)
        fit_patches(path, args.radius, **kw)
        local, t_local = _timed(fit_patches, path, args.radius, **kw)
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        with distributed.Client(cluster) as client:
            fit_patches(path, args.radius, engine=client, **kw)  # compile on the workers
            remote, t_dask = _timed(fit_patches, path, args.radius, engine=client, **kw)
        cluster.close()
    if local.n_components == remote.n_components:
        diff = float(np.abs(local.C - remote.C).max() / np.abs(local.C).max())
        same = f"same K={local.n_components}, max |C diff| / max |C| = {diff:.1e}"
    else:
        same = f"K differs: {local.n_components} vs {remote.n_components}"
    res = (f"{s}x{s}x{args.frames // 4}: local {t_local:.1f} s, Dask 2 workers {t_dask:.1f} s "
           f"(ratio {t_local / t_dask:.2f}x); {same}")
    _row("scale: local vs Dask LocalCluster (fit_patches)", res, "python experiments/bench_scale.py --sections dask",
         args.append)


SECTIONS = {"accuracy": accuracy, "ooc": out_of_core, "scaling": scaling, "devices": devices, "dask": dask_vs_local}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="accuracy,ooc,scaling,devices,dask",
                    help="comma-separated: " + ",".join(SECTIONS))
    ap.add_argument("--shape", type=int, default=128, help="field side for accuracy and ooc (issue: 512)")
    ap.add_argument("--frames", type=int, default=600, help="frames for accuracy; the longest scaling length")
    ap.add_argument("--ooc-frames", type=int, default=2000, help="frames of the out-of-core movie (issue: 20000)")
    ap.add_argument("--block", type=int, default=500, help="simulated frames repeated to build the ooc movie")
    ap.add_argument("--memory-budget", default="2GB")
    ap.add_argument("--scale-side", type=int, default=48,
                    help="largest field side of the scaling runs (devices and dask: twice it)")
    ap.add_argument("--scale-sides", default=None,
                    help="scaling: field sides for the pixels sweep, e.g. 128,192,256 (default S/2, 3S/4, S)")
    ap.add_argument("--radius", type=float, default=4.0)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--tmp", default=None, help="folder for temporary movies (default: the system's)")
    ap.add_argument("--workdir", default=None, help="ooc: keep the movie and patch checkpoints here (resumable)")
    ap.add_argument("--append", action="store_true", help="append rows to experiments/RESULTS.md")
    ap.add_argument("--note", default="", help="added to each row (e.g. the machine's load)")
    args = ap.parse_args(argv)
    global LOAD_NOTE
    LOAD_NOTE = args.note
    for name in args.sections.split(","):
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
