"""`jaxcnmf demo`: simulate a movie with known neurons, fit it, score the fit and draw a summary figure.

The first command a new user runs: it exercises the whole pipeline (sim -> fit -> metrics -> io) in a minute or two.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# (H, W), frames, neurons: the default finishes in about a minute on a 2-core laptop; --small in a few seconds more
# than the compile time.
SIZES = {
    "default": dict(shape=(96, 96), n_frames=1500, n_neurons=30),
    "small": dict(shape=(48, 48), n_frames=500, n_neurons=8),
}


def summary_figure(path: str, image: np.ndarray, A_est: np.ndarray, A_true: np.ndarray | None = None, *,
                   accepted: np.ndarray | None = None, traces: list | None = None, title: str = "",
                   threshold: float = 0.3) -> bool:
    """Save contours of estimated (and true) footprints over an image, plus a few traces; False without matplotlib.

    **Arguments:**

    - `path`: image file to write (.png).
    - `image`: `(H, W)` background image (e.g. the correlation image).
    - `A_est`: `(K, H, W)` estimated footprints (contour at `threshold` of each one's max); `accepted`: `(K,)` bool,
      rejected components drawn dashed.
    - `A_true`: optional `(N, H, W)` true footprints or label masks.
    - `traces`: optional list of `(label, estimate (T,), truth (T,) or None)` to plot below.
    - `title`: figure title.

    **Returns:** whether the figure was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    traces = traces or []
    n_tr = len(traces)
    fig = plt.figure(figsize=(9, 7 + 1.1 * n_tr))
    top = 7 / (7 + 1.1 * n_tr)
    ax = fig.add_axes([0.05, 1 - top + 0.02, 0.9, top - 0.09])  # room for the title above, a margin below
    ax.imshow(image, cmap="gray")
    if A_true is not None:
        for a in np.asarray(A_true, np.float32):
            if a.max() > 0:
                ax.contour(a, levels=[threshold * a.max()], colors="tab:red", linewidths=1.0)
    for k, a in enumerate(np.asarray(A_est, np.float32)):
        if a.max() > 0:
            ok = accepted is None or bool(accepted[k])
            ax.contour(a, levels=[threshold * a.max()], colors="tab:cyan" if ok else "tab:orange",
                       linewidths=1.0, linestyles="solid" if ok else "dashed")
    ax.set_title(title + "\nred: truth, cyan: accepted estimate, orange dashed: rejected", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for i, (label, est, true) in enumerate(traces):
        h = 1.1 / (7 + 1.1 * n_tr)
        tax = fig.add_axes([0.05, (n_tr - 1 - i) * h + 0.01, 0.9, h * 0.85])
        est = np.asarray(est, np.float64)
        if true is not None:
            true = np.asarray(true, np.float64)
            tax.plot(true / max(true.max(), 1e-12), color="tab:red", lw=0.8, label="truth")
        tax.plot(est / max(est.max(), 1e-12), color="tab:blue", lw=0.8, label="estimate")
        tax.set_ylabel(label, fontsize=7)
        tax.set_yticks([])
        if i < n_tr - 1:
            tax.set_xticks([])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="simulate a movie, fit it, score it and draw a summary figure",
        description="Simulate a calcium-imaging movie with known neurons (jaxcnmf.sim), fit it (jaxcnmf.fit), score "
        "the fit against the truth (F1 of footprint matching, calcium and spike correlations), and write the movie's "
        "truth, the result file, the scores and a summary figure into a folder.",
    )
    p.add_argument("--out", default="jaxcnmf_demo", help="output folder (default: jaxcnmf_demo/)")
    p.add_argument("--small", action="store_true", help="a smaller movie (48x48x500, 8 neurons) for a quick check")
    p.add_argument("--seed", type=int, default=0, help="simulation and fit seed (default 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..fit import fit
    from ..io import save_result
    from ..metrics import score_result
    from ..plot import local_correlation_image
    from ..sim import save_truth, simulate

    os.makedirs(args.out, exist_ok=True)
    size = SIZES["small" if args.small else "default"]
    t0 = time.perf_counter()
    movie, truth = simulate(seed=args.seed, overlap=0.2, peak_snr=4.0, **size)
    print(f"simulated {movie.shape[0]} frames of {movie.shape[1]}x{movie.shape[2]} with {truth.A.shape[0]} neurons "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    radius = float(truth.params.get("radius", 4.0))
    t1 = time.perf_counter()
    result = fit(movie, radius, fps=truth.fps, seed=args.seed, progress=True)
    t_fit = time.perf_counter() - t1
    scores = score_result(result, truth=truth, fps=truth.fps)

    # HDF5 when h5py is installed (the `hdf5` extra), else the same layout as .npz: the demo must run on a bare install.
    try:
        import h5py  # noqa: F401

        res_path = os.path.join(args.out, "result.h5")
    except ImportError:
        res_path = os.path.join(args.out, "result.npz")
    save_result(res_path, result)
    save_truth(os.path.join(args.out, "truth.npz"), truth)
    from ..io import atomic_output

    scores_path = os.path.join(args.out, "scores.json")
    with atomic_output(scores_path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(dict(scores, fit_seconds=t_fit), fh, indent=1)

    rows = [
        ("neurons (true)", scores["n_true"]), ("components (accepted)", scores["n_est"]),
        ("matched", scores["matched"]), ("precision", scores["precision"]), ("recall", scores["recall"]),
        ("F1", scores["f1"]), ("median calcium corr", scores.get("calcium_corr_median")),
        ("median spike corr (40 ms)", scores.get("spike_corr_median")), ("fit time (s)", t_fit),
    ]
    print("\njaxcnmf demo: fit scored against the simulation's ground truth")
    for name, value in rows:
        text = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        print(f"  {name:<28s} {text:>8s}")

    fig_path = os.path.join(args.out, "summary.png")
    pairs = np.asarray(scores.get("pairs", []), int).reshape(-1, 2)
    traces = [(f"est {e} / true {t}", np.asarray(result.C[e]), truth.C[t]) for e, t in pairs[:4]]
    drawn = summary_figure(fig_path, local_correlation_image(movie), np.asarray(result.A), truth.A,
                           accepted=None if result.accepted is None else np.asarray(result.accepted),
                           traces=traces, title=f"jaxcnmf demo: F1 {scores['f1']:.2f}")
    print(f"\nwrote {res_path}, {os.path.join(args.out, 'truth.npz')}, {scores_path}"
          + (f", {fig_path}" if drawn else " (no figure: matplotlib is not installed; pip install jaxcnmf[plot])"))
    return 0
