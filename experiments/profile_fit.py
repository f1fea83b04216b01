"""Profile of the full fit: where the time of `jaxcnmf.fit` goes, stage by stage, split into compilation and run.

The same simulated movie (built as `bench_fit.py --parts sim` builds it: 256x256x3000, 150 neurons, overlap 0.3,
neuropil 0.3, AR(2), peak SNR 4 by default) is fitted twice in one process. Per stage (`Result.params["timings"]`)
it prints the first (cold) and second (warm) seconds, their difference (what the first call spent compiling and
tracing), the XLA compilations counted in each stage (`jax.monitoring` backend-compile events: jitted functions and
op-by-op dispatches alike), their backend-compile seconds, the most frequently compiled functions (from
`jax_log_compiles`), and the process's peak resident memory after each fit.

    python experiments/profile_fit.py                       # 256x256x3000, 150 neurons
    python experiments/profile_fit.py --side 96 --frames 1000 --neurons 30 --runs 3
    python experiments/profile_fit.py --top 20              # more function names per stage

Nothing is appended to RESULTS.md: this is a tool for finding bottlenecks, the comparison with suite2p is
`bench_fit.py`'s.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class CompileLog:
    """Counts XLA compilations (and their backend seconds) and the names of compiled functions, per fit stage."""

    NAME = re.compile(r"(?:Compiling|Finished .*? for) (?:jit\()?([\w<>.\-]+)")

    def __init__(self):
        import jax
        import jax.monitoring as monitoring

        self.count = 0
        self.seconds = 0.0
        self.trace_seconds = 0.0
        self.names: collections.Counter = collections.Counter()
        monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.config.update("jax_log_compiles", True)
        handler = logging.Handler()
        handler.emit = self._on_log
        for name in ("jax._src.interpreters.pxla", "jax._src.dispatch", "jax._src.compiler"):
            lg = logging.getLogger(name)
            lg.addHandler(handler)
            lg.setLevel(logging.DEBUG)
            lg.propagate = False  # keep the log lines off stderr

    def _on_duration(self, event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += secs
        elif event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            self.trace_seconds += secs

    def _on_log(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            m = self.NAME.match(msg)
            self.names[m.group(1) if m else msg[:40]] += 1

    def snapshot(self):
        return self.count, self.seconds, self.trace_seconds, collections.Counter(self.names)


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM) in GiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=256, help="field side in pixels")
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--neurons", type=int, default=150)
    ap.add_argument("--snr", type=float, default=4.0, help="peak SNR")
    ap.add_argument("--runs", type=int, default=2, help="fits of the same movie in this process (>= 2)")
    ap.add_argument("--top", type=int, default=6, help="most compiled function names shown per stage")
    ap.add_argument("--score", action="store_true", help="also score the last fit against the truth")
    ap.add_argument("--json", default=None, help="write the per-stage numbers to this file")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a fit parameter override (JSON value), e.g. --param n_iter=2")
    args = ap.parse_args()

    log = CompileLog()
    import jaxcnmf.fit as fitmod
    from jaxcnmf.sim import simulate

    overrides = {}
    for item in args.param:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)

    H, T, n = args.side, args.frames, args.neurons
    t0 = time.perf_counter()
    movie, truth = simulate(seed=0, shape=(H, H), n_frames=T, n_neurons=n, overlap=0.3, peak_snr=args.snr,
                            neuropil=0.3, tau_rise=0.05)
    print(f"simulated {H}x{H}x{T}, {n} neurons in {time.perf_counter() - t0:.1f} s; load avg "
          f"{os.getloadavg()[0]:.1f}; peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    radius = float(truth.params["radius"])

    per_stage: list[dict] = []  # one dict per run: stage -> (count, secs, trace secs, names)
    done = fitmod.Progress.done

    def done_hook(self, stage, info=""):
        done(self, stage, info)
        cur = log.snapshot()
        prev = self._profile_prev
        self._profile_prev = cur
        rec = self._profile_rec.setdefault(stage, [0, 0.0, 0.0, collections.Counter()])
        rec[0] += cur[0] - prev[0]
        rec[1] += cur[1] - prev[1]
        rec[2] += cur[2] - prev[2]
        rec[3].update(cur[3] - prev[3])

    fitmod.Progress.done = done_hook
    orig_init = fitmod.Progress.__init__

    def init_hook(self, *a, **kw):
        orig_init(self, *a, **kw)
        self._profile_prev = log.snapshot()
        self._profile_rec = {}
        per_stage.append(self._profile_rec)

    fitmod.Progress.__init__ = init_hook

    results, walls, rss = [], [], []
    for r in range(max(2, args.runs)):
        t0 = time.perf_counter()
        res = fitmod.fit(movie, radius, fps=truth.fps, **overrides)
        walls.append(time.perf_counter() - t0)
        rss.append(peak_rss_gib())
        results.append(res)
        print(f"fit {r + 1}: {walls[-1]:.1f} s, K={res.n_components}, peak RSS so far {rss[-1]:.2f} GiB, "
              f"load avg {os.getloadavg()[0]:.1f}", flush=True)

    cold, warm = results[0].params["timings"], results[-1].params["timings"]
    rec0, rec1 = per_stage[0], per_stage[-1]
    print()
    print(f"{'stage':<18s} {'cold s':>7s} {'warm s':>7s} {'diff s':>7s} {'#XLA':>5s} {'XLA s':>6s} {'trace s':>7s}"
          f" {'#XLA warm':>9s}  most compiled (cold)")
    rows = []
    for stage in cold:
        c, w = cold[stage], warm.get(stage, float("nan"))
        n0, s0, tr0, names = rec0.get(stage, [0, 0.0, 0.0, collections.Counter()])
        n1 = rec1.get(stage, [0])[0]
        top = ", ".join(f"{k} x{v}" for k, v in names.most_common(args.top))
        print(f"{stage:<18s} {c:7.2f} {w:7.2f} {c - w:7.2f} {n0:5d} {s0:6.2f} {tr0:7.2f} {n1:9d}  {top}")
        rows.append(dict(stage=stage, cold=c, warm=w, compiles=n0, compile_s=s0, trace_s=tr0, compiles_warm=n1,
                         top=names.most_common(args.top)))
    tot = lambda rec, i: sum(v[i] for v in rec.values())  # noqa: E731
    print(f"{'total':<18s} {sum(cold.values()):7.2f} {sum(warm.values()):7.2f} "
          f"{sum(cold.values()) - sum(warm.values()):7.2f} {tot(rec0, 0):5d} {tot(rec0, 1):6.2f} {tot(rec0, 2):7.2f}"
          f" {tot(rec1, 0):9d}")
    print(f"wall: cold {walls[0]:.1f} s, warm {walls[-1]:.1f} s; peak RSS {rss[-1]:.2f} GiB; "
          f"load avg {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}")
    if args.score:
        from jaxcnmf.metrics import score_result

        s = score_result(results[-1], truth=truth, fps=truth.fps)
        print(f"score: F1 {s['f1']:.3f} (P {s['precision']:.3f} R {s['recall']:.3f}, {s['n_est']} components), "
              f"calcium corr {s['calcium_corr_median']:.3f}, spike corr {s['spike_corr_median']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(shape=[T, H, H], walls=walls, peak_rss_gib=rss[-1], stages=rows,
                           load=os.getloadavg()), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
