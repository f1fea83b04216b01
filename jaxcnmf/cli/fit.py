"""`jaxcnmf fit`: fit CNMF to a movie file and write the result file (HDF5 or .npz).

A thin layer over `jaxcnmf.fit.fit` and `jaxcnmf.io.save_result`; prints one progress line per stage to stderr.
"""

from __future__ import annotations

import os
import sys


def default_output(movie: str) -> str:
    """`movie stem + _cnmf.h5` next to the movie (for `file.h5:/data`, next to `file.h5`; for a folder, beside it)."""
    path = movie.split(".h5:")[0] + ".h5" if ".h5:" in movie else movie
    path = path.rstrip("/\\")
    stem = path if os.path.isdir(path) else os.path.splitext(path)[0]
    return stem + "_cnmf.h5"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="find, demix and deconvolve the neurons of a movie (CNMF)",
        description="Fit CNMF to a movie (multi-page TIFF, a folder of TIFF frames, .npy, or file.h5:/dataset) and "
        "write footprints, calcium traces, spikes, background, noise and quality per component to a result file. "
        "Only the neuron radius is required; everything else has defaults derived from the data.",
    )
    p.add_argument("movie", help="the movie: .tif/.tiff, a folder of single-frame TIFFs, .npy, or file.h5:/dataset")
    p.add_argument("--neuron-radius", type=float, required=True,
                   help="expected soma radius in pixels (CaImAn gSig); measure a typical cell on the mean image")
    p.add_argument("--fps", type=float, default=None, help="frame rate in Hz (optional; CaImAn fr)")
    p.add_argument("--K", type=int, default=None,
                   help="upper bound on the number of components (default: the initialisation stops by itself)")
    p.add_argument("--p", type=int, choices=(1, 2), default=2, help="AR order of the calcium kinetics (default 2)")
    p.add_argument("--nb", type=int, default=1, help="number of background components (default 1)")
    p.add_argument("--n-iter", type=int, default=None, help="outer iterations (default 2)")
    p.add_argument("--merge-thr", type=float, default=None, help="trace correlation for merging (default 0.85)")
    p.add_argument("--min-snr", type=float, default=None, help="acceptance: minimum trace SNR (default 2.5)")
    p.add_argument("--rval-thr", type=float, default=None, help="acceptance: minimum spatial correlation (default 0.8)")
    p.add_argument("--init", choices=("greedy", "sparse_nmf", "dendrite"), default=None,
                   help="initialisation: greedy (somata, default), dendrite (event-triggered start for "
                        "dendrites/axons) or sparse_nmf")
    p.add_argument("--spatial-method", choices=("constrained", "hals"), default=None,
                   help="footprint update: hals (default; keeps dim cells' footprints whole) or constrained (the "
                   "per-pixel noise-constrained sparse update)")
    p.add_argument("--temporal-groups", choices=("disjoint", "all"), default=None,
                   help="temporal update: groups of non-overlapping components in turn (default) or all at once")
    p.add_argument("--footprint-median", type=int, default=None,
                   help="median filter of each footprint in pixels, odd (CaImAn medw; default 3 for somata, 1 = "
                        "none for --init dendrite/sparse_nmf)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--repair-nonfinite", action="store_true",
                   help="interpolate NaN/inf pixels instead of stopping with an error")
    p.add_argument("-o", "--output", default=None,
                   help="result file, .h5 or .npz (default: the movie's stem + _cnmf.h5 next to it)")
    g = p.add_argument_group("large movies (patch mode; any of these turns it on)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="fit in equal overlapping patches of this side in pixels, stitch, refine on the whole field "
                        "(CaImAn rf, about patch_size/2); the movie is streamed from disk, never loaded whole")
    g.add_argument("--overlap", type=int, default=None,
                   help="pixels shared by neighbouring patches (CaImAn stride; default 4 neuron radii)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="folder for per-patch results: a killed run resumes where it stopped, with the same result")
    g.add_argument("--memory-budget", default=None,
                   help='memory the run keeps to, e.g. "2GB": sets the chunks of the streamed passes and, for long '
                        'movies, the frames binned together for the patch fits (the result stays at full rate)')
    g.add_argument("--engine", choices=("local", "dask"), default=None,
                   help="where patches run: this process (default) or a Dask cluster (the current client or a new "
                        "local one)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..fit import fit
    from ..io import save_result

    out = args.output or default_output(args.movie)
    if not out.endswith((".h5", ".hdf5", ".npz")):
        from ..errors import ParameterError

        raise ParameterError(f"--output {out!r}: the result file must end in .h5, .hdf5 or .npz")
    overrides = {k: v for k, v in dict(
        p=args.p, nb=args.nb, n_iter=args.n_iter, merge_thr=args.merge_thr, min_snr=args.min_snr,
        rval_thr=args.rval_thr, init=args.init, spatial_method=args.spatial_method, seed=args.seed,
        footprint_median=args.footprint_median, temporal_groups=args.temporal_groups,
    ).items() if v is not None}
    if args.repair_nonfinite:
        overrides["nonfinite"] = "repair"
    patch_mode = any(v is not None for v in (args.patch_size, args.overlap, args.checkpoint_dir,
                                               args.memory_budget, args.engine))
    if patch_mode:
        from ..patches import fit_patches

        result = fit_patches(args.movie, args.neuron_radius, fps=args.fps, K=args.K,
                             patch_size=args.patch_size or 64, overlap=args.overlap,
                             checkpoint_dir=args.checkpoint_dir, memory_budget=args.memory_budget,
                             engine=args.engine or "local", progress=not args.quiet, **overrides)
    else:
        result = fit(args.movie, args.neuron_radius, fps=args.fps, K=args.K, progress=not args.quiet, **overrides)
    save_result(out, result)
    n = result.n_components
    n_acc = int(result.accepted.sum()) if result.accepted is not None else n
    print(f"{n} components ({n_acc} accepted) -> {out}", file=sys.stdout)
    return 0
