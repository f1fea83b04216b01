"""Spike inference on real ground truth: jaxcnmf vs OASIS, same traces, same protocol, one run.

For each data set (5 cascade sets, spikefinder 4/5/6 training sets) and AR order p = 1, 2, every neuron's trace is
deconvolved (noise-constrained, baseline estimated) by `jaxcnmf.deconv.deconvolve_batch` (all traces of a set in one
batched call) and by `oasis.functions.deconvolve` (one call per trace); the inferred spikes and the true spikes are
summed in 40 ms bins (one frame where frames are slower) and correlated; the median over neurons is reported.

Protocols (each applied identically to both tools):
- `own`: each tool estimates sn and g its own way (jaxcnmf: what `deconvolve_batch` does when sn and g are not
  given, `deconv._estimate`: PSD mean over [f_c/2, f_c] with f_c from each trace's spectrum (`noise.noise_cutoff`:
  0.5 of the frame rate unless the trace was resampled or low-pass filtered), Yule-Walker with the band-limited
  noise's autocovariance removed, AR(1) over as many lags as its decay time, AR(2) over 5 extra lags; OASIS: its
  `estimate_parameters`, PSD mean over 0.25-0.5 and 10 lags, fudge factor 0.98).
- `band`: (an older experiment, kept for comparison; `own` now chooses jaxcnmf's band itself) the noise band is set
  from the data with a fixed PSD floor. Spikefinder traces were resampled to 100 Hz from slower recordings,
  so their top frequencies hold no noise at all (the PSD falls by >1e6) and sn from 0.25-0.5 is ~0, which forces
  c = y. Here the band is the upper half of the band that holds signal (`effective_band`): [f_eff/2, f_eff], with
  f_eff where the PSD last exceeds 1e-4 of its maximum. For cascade data f_eff is the Nyquist rate (no change).
  jaxcnmf: estimate_noise/estimate_ar with that band; OASIS: GetSn with that band, then its own g estimate with
  that sn (estimate_time_constant, lags 10, fudge 0.98).
- `shared`: OASIS is given jaxcnmf's `band` g and sn (the two solvers on identical problems).
- `freeb`: as `own`, but both baselines may be negative (jaxcnmf `baseline=True`, OASIS `b_nonneg=False`). Both
  tools keep b >= 0 by default: on dF/F traces that dip below their resting level a free baseline follows the dips,
  and the noise budget is then spent on spikes riding slow drift (this protocol shows how much that costs).
- `detrend`: as `own` on traces minus a slow baseline (Gaussian smoothing over 0.1 s, then a running minimum and a
  running maximum over 30 s: a max-min envelope that follows slow drift but not transients).

OASIS's spikes under `own`, `band`, `freeb` and `detrend` depend only on the traces, so they are cached on disk
(`experiments/out/oasis_cache/`, one file per data set, AR order, protocol and s_min, keyed by a hash of the traces
and the oasis-deconv version; `--no-cache` recomputes them). With the cache, a full run is the jaxcnmf part only.

Run from the repository root: `python experiments/bench_spikes_real.py [--sets DS01,spikefinder4] [--p 1,2]
[--protocols own,band,shared] [--refine-g auto|on|off] [--no-cache] [--no-record]`. `--sets` takes substrings of the names (DS01-OGB1-m-V1,
DS09-GCaMP6f-m-V1, DS14-GCaMP6s-m-V1, DS21-jGECO1a-m-V1, DS29-GCaMP7f-m-V1, spikefinder4-OGB-1,
spikefinder5-GCaMP6s, spikefinder6-GCaMP5k). Appends rows to experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _realdata import Recording, all_sets, bin_width, spike_correlation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MACHINE = "2-core CPU (this dev box), no GPU"
CACHE = Path(__file__).resolve().parent / "out" / "oasis_cache"
CACHED_PROTOCOLS = ("own", "band", "freeb", "detrend")  # OASIS's result depends on the traces only


def effective_band(y: np.ndarray, floor: float = 1e-4) -> tuple[float, float]:
    """Noise band (fractions of the frame rate) = upper half of the band that holds any power.

    f_eff is the highest frequency whose (Welch, 256-frame segments) PSD exceeds `floor` times the PSD's maximum
    above 2 % of the frame rate; the band is [f_eff / 2, f_eff], i.e. (0.25, 0.5) for data that were not resampled.
    """
    from scipy.signal import welch

    f, P = welch(y - y.mean(), fs=1.0, nperseg=min(256, y.size))
    above = f > 0.02
    peak = P[above].max()
    live = np.flatnonzero(above & (P > floor * peak))
    f_eff = float(f[live[-1]]) if live.size else 0.5
    f_eff = min(0.5, max(f_eff, 0.05))
    return (f_eff / 2, f_eff)


def detrended(recs: list[Recording], window_s: float = 30.0, smooth_s: float = 0.1) -> list[Recording]:
    """Each trace minus its slow baseline: running max of the running min of the Gaussian-smoothed trace."""
    from scipy.ndimage import gaussian_filter1d, maximum_filter1d, minimum_filter1d

    out = []
    for r in recs:
        w = max(3, int(round(window_s * r.fps)))
        smooth = gaussian_filter1d(r.y, max(smooth_s * r.fps, 0.5), mode="nearest")
        base = maximum_filter1d(minimum_filter1d(smooth, w, mode="nearest"), w, mode="nearest")
        out.append(dataclasses.replace(r, y=r.y - base))
    return out


def padded(recs: list[Recording]) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) float32 traces padded with zeros after each length, and the lengths."""
    lengths = np.array([r.y.size for r in recs])
    Y = np.zeros((len(recs), lengths.max()), np.float32)
    for i, r in enumerate(recs):
        Y[i, : r.y.size] = r.y
    return Y, lengths


def kinetics_ours(recs, p: int, protocol: str):
    """jaxcnmf's sn (N,) and g (N, p) per trace (each from its own frames), batched over traces that share a band."""
    from jaxcnmf.deconv import TRACE_NOISE_METHOD
    from jaxcnmf.noise import estimate_ar, estimate_noise

    Y, lengths = padded(recs)
    bands = [effective_band(r.y) if protocol in ("band", "shared") else (0.25, 0.5) for r in recs]
    sn = np.zeros(len(recs), np.float32)
    for band in sorted(set(bands)):
        rows = np.array([i for i, b in enumerate(bands) if b == band])
        sn[rows] = np.asarray(estimate_noise(Y[rows], freq_range=band, length=lengths[rows], method=TRACE_NOISE_METHOD))
    g = np.asarray(estimate_ar(Y, p, sn=sn, length=lengths))
    return sn, g


REFINE_G = {"auto": None, "on": True, "off": False}  # --refine-g -> deconvolve_batch(refine_g=...)


def run_ours(recs, p: int, protocol: str, s_min: float = 0.0, refine_g=None):
    """jaxcnmf's spikes per trace, the seconds taken, and its (sn, g). Under `own`, `freeb` and `detrend`,
    `deconvolve_batch` estimates sn and g itself (the library's default rule, `deconv._estimate`)."""
    from jaxcnmf.deconv import deconvolve_batch

    Y, lengths = padded(recs)
    baseline = True if protocol == "freeb" else "nonneg"
    t0 = time.perf_counter()
    if protocol in ("band", "shared"):
        sn, g = kinetics_ours(recs, p, protocol)
        res = deconvolve_batch(Y, g, sn, length=lengths, p=p, s_min=s_min, baseline=baseline, refine_g=refine_g)
    else:
        res = deconvolve_batch(Y, length=lengths, p=p, s_min=s_min, baseline=baseline, refine_g=refine_g)
    S = np.asarray(res.s)
    seconds = time.perf_counter() - t0
    return [S[i, : r.y.size] for i, r in enumerate(recs)], seconds, (np.asarray(res.sn), np.asarray(res.g))


def _cache_file(name: str, recs, p: int, protocol: str, s_min: float) -> Path:
    from importlib.metadata import version

    h = hashlib.sha1(version("oasis-deconv").encode())
    for r in recs:
        h.update(np.ascontiguousarray(r.y, np.float64).tobytes())
    return CACHE / f"{name}_p{p}_{protocol}_smin{s_min:g}_{h.hexdigest()[:12]}.npz"


def run_oasis_cached(name: str, recs, p: int, protocol: str, s_min: float = 0.0, use_cache: bool = True):
    """`run_oasis` for the protocols whose OASIS result depends on the traces only, read from / written to the
    cache; the seconds are those of the run that filled the cache."""
    path = _cache_file(name, recs, p, protocol, s_min)
    if use_cache and path.exists():
        with np.load(path) as z:
            return [z[f"s{i}"] for i in range(len(recs))], float(z["seconds"])
    S, seconds = run_oasis(recs, p, protocol, None, s_min)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, seconds=seconds, **{f"s{i}": s for i, s in enumerate(S)})
    os.replace(tmp, path)
    return S, seconds


def run_oasis(recs, p: int, protocol: str, shared=None, s_min: float = 0.0):
    from oasis.functions import GetSn, deconvolve, estimate_time_constant

    out = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, r in enumerate(recs):
            y = r.y.astype(np.float64)
            kw = {"s_min": s_min} if s_min > 0 else {}
            if protocol in ("own", "detrend"):
                res = deconvolve(y, g=(None,) * p, penalty=1, **kw)
            elif protocol == "freeb":
                res = deconvolve(y, g=(None,) * p, penalty=1, b_nonneg=False, **kw)
            elif protocol == "band":
                sn = GetSn(y, range_ff=list(effective_band(r.y)))
                g = estimate_time_constant(y, p, sn, lags=10, fudge_factor=0.98)
                res = deconvolve(y, g=tuple(g), sn=sn, penalty=1, **kw)
            else:  # shared: jaxcnmf's kinetics and noise
                sn, g = shared
                res = deconvolve(y, g=as_float64_kernel(g[i]), sn=float(sn[i]), penalty=1, **kw)
            out.append(np.asarray(res[1]))
    return out, time.perf_counter() - t0


def as_float64_kernel(g) -> tuple:
    """A float32 AR kernel as float64 numbers, keeping g2 >= -g1^2/4 (a double root cast up must stay real)."""
    g = np.asarray(g, np.float64).copy()
    if g.size == 2:
        g[1] = max(g[1], -g[0] * g[0] / 4)
    return tuple(float(v) for v in g)


def median_corr(recs, S) -> float:
    return float(np.nanmedian([spike_correlation(r, s) for r, s in zip(recs, S)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="", help="comma-separated substrings of data-set names (default: all)")
    ap.add_argument("--p", default="1,2", help="AR orders to run (default 1,2)")
    ap.add_argument("--protocols", default="own,band,shared,freeb,detrend",
                    help="subset of own,band,shared,freeb,detrend")
    ap.add_argument("--s-min", type=float, default=0.0, help="minimum spike size for both tools (default 0)")
    ap.add_argument("--refine-g", choices=sorted(REFINE_G), default="auto",
                    help="jaxcnmf's refine_g: auto (the library default: estimated AR(1) kernels), on, off")
    ap.add_argument("--no-cache", action="store_true", help="recompute OASIS's results instead of reading the cache")
    ap.add_argument("--note", default="", help="free text added to the machine column of RESULTS.md")
    ap.add_argument("--no-record", action="store_true", help="do not append to experiments/RESULTS.md")
    args = ap.parse_args(argv)
    orders = [int(v) for v in args.p.split(",")]
    protocols = [v for v in args.protocols.split(",") if v]
    wanted = [w for w in args.sets.split(",") if w]
    sets = [(n, r) for n, r in all_sets() if not wanted or any(w in n for w in wanted)]
    if not sets:
        print("no data sets found under ../shared/data (cascade, spikefinder)")
        return 1
    rows = []
    header = f"{'data set':24s} {'n':>3s} {'fps':>6s} {'bin ms':>6s} {'p':>2s} {'protocol':>8s} {'jaxcnmf':>8s} " \
             f"{'OASIS':>8s} {'ours-OASIS':>10s} {'t_ours s':>8s} {'t_OASIS s':>9s}"
    print(header)
    for name, raw in sets:
        fps = float(np.median([r.fps for r in raw]))
        width = bin_width(fps) * 1000
        for p in orders:
            shared = None
            for protocol in protocols:
                recs = detrended(raw) if protocol == "detrend" else raw
                if protocol == "freeb":
                    S_j, t_ours, _ = run_ours(recs, p, "freeb", args.s_min, REFINE_G[args.refine_g])
                    r_ours = median_corr(recs, S_j)
                    S_o, t_o = run_oasis_cached(name, recs, p, "freeb", args.s_min, not args.no_cache)
                elif protocol == "shared":
                    if shared is None:
                        S_j, t_ours, shared = run_ours(recs, p, "band", args.s_min, REFINE_G[args.refine_g])
                        r_ours = median_corr(recs, S_j)
                    else:
                        r_ours, t_ours = rows_lookup(rows, name, p, "band"), float("nan")
                    S_o, t_o = run_oasis(recs, p, "shared", shared, args.s_min)
                else:
                    S_j, t_ours, kin = run_ours(recs, p, protocol, args.s_min, REFINE_G[args.refine_g])
                    if protocol == "band":
                        shared = kin
                    r_ours = median_corr(recs, S_j)
                    S_o, t_o = run_oasis_cached(name, recs, p, protocol, args.s_min, not args.no_cache)
                r_oasis = median_corr(recs, S_o)
                rows.append((name, len(recs), fps, width, p, protocol, r_ours, r_oasis, t_ours, t_o))
                print(f"{name:24s} {len(recs):3d} {fps:6.1f} {width:6.0f} {p:2d} {protocol:>8s} {r_ours:8.3f} "
                      f"{r_oasis:8.3f} {r_ours - r_oasis:+10.3f} {t_ours:8.2f} {t_o:9.2f}", flush=True)
    if not args.no_record:
        record(rows, argv, args.s_min, args.note)
    return 0


def rows_lookup(rows, name, p, protocol) -> float:
    for row in rows:
        if row[0] == name and row[4] == p and row[5] == protocol:
            return row[6]
    return float("nan")


def load_note() -> str:
    """The 1-minute load average (the dev box's 2 cores are shared: timings are noisy when it is above ~1)."""
    try:
        return f"load avg {os.getloadavg()[0]:.1f}"
    except OSError:
        return ""


def record(rows, argv, s_min: float, note: str = "") -> None:
    """Append one RESULTS.md row per (data set, p): median correlations of both tools under each protocol."""
    if not RESULTS.exists():
        RESULTS.write_text("| date | benchmark | machine | result | command |\n|---|---|---|---|---|\n")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python experiments/bench_spikes_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    by_key: dict = {}
    for name, n, fps, width, p, protocol, r_ours, r_oasis, _, _ in rows:
        by_key.setdefault((name, n, fps, width, p), []).append((protocol, r_ours, r_oasis))
    machine = "; ".join(v for v in (MACHINE, load_note(), note) if v)
    lines = []
    for (name, n, fps, width, p), items in by_key.items():
        parts = "; ".join(f"{proto}: jaxcnmf {a:.3f} vs OASIS {b:.3f} ({a - b:+.3f})" for proto, a, b in items)
        extra = f", s_min {s_min:g}" if s_min else ""
        lines.append(f"| {date} | spike inference {name} (n={n}, {fps:.0f} Hz, {width:.0f} ms bins, AR({p}){extra}), "
                     f"median corr. with true spikes | {machine} | {parts} | `{cmd.strip()}` |\n")
    with open(RESULTS, "a") as fh:
        fh.writelines(lines)
    print(f"appended {len(lines)} rows to {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
