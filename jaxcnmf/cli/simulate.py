"""`jaxcnmf simulate`: write a simulated two-photon movie and its ground truth (`movie.tif` + `movie_truth.npz`).

A thin layer over `jaxcnmf.sim.simulate` (the knobs and their units are documented on `jaxcnmf.sim.SimParams`) and
`jaxcnmf.io.save_movie`.
"""

from __future__ import annotations

import argparse
import os

from ..errors import ParameterError

_MOVIE_EXTS = (".tif", ".tiff", ".npy")
_H5_EXTS = (".h5", ".hdf5")

# command-line option -> SimParams field (options left unset keep the SimParams default)
_KNOBS = {
    "frames": "n_frames",
    "fps": "fps",
    "neurons": "n_neurons",
    "radius": "radius",
    "overlap": "overlap",
    "tau_decay": "tau_decay",
    "tau_rise": "tau_rise",
    "rate": "spike_rate",
    "snr": "peak_snr",
    "noise": "noise",
    "motion": "motion_px",
    "background_rank": "background_rank",
    "neuropil": "neuropil",
    "background_level": "background_level",
    "offset": "offset",
}


def add_parser(subparsers) -> None:
    from ..sim import SimParams

    d = SimParams()
    p = subparsers.add_parser(
        "simulate",
        help="write a simulated movie with known neurons and its ground truth",
        description="Simulate a two-photon calcium-imaging movie (somata or dendrites, AR(1)/AR(2) calcium, bursts, "
        "smooth background and neuropil, Gaussian or Poisson-Gaussian noise at a requested peak SNR, optional rigid "
        "motion) and write it with its ground truth (A, C, S, b, f, sn, g, centres, shifts) as STEM_truth.npz next "
        "to it. The same seed and options give the same movie.",
    )
    p.add_argument("-o", "--output", required=True,
                   help="movie file: .tif/.tiff, .npy or file.h5:/dataset (the truth goes to STEM_truth.npz)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, default=d.shape[0], help=f"field height in pixels (default {d.shape[0]})")
    p.add_argument("--width", type=int, default=d.shape[1], help=f"field width in pixels (default {d.shape[1]})")
    p.add_argument("--frames", type=int, help=f"number of frames (default {d.n_frames})")
    p.add_argument("--fps", type=float, help=f"frame rate in Hz (default {d.fps:g})")
    p.add_argument("--neurons", type=int, help=f"number of neurons, or of processes with --dendrites "
                   f"(default {d.n_neurons})")
    p.add_argument("--radius", type=float, help=f"mean soma radius in pixels (default {d.radius:g})")
    p.add_argument("--overlap", type=float, help=f"fraction of neurons placed overlapping a neighbour, 0..1 "
                   f"(default {d.overlap:g})")
    p.add_argument("--tau-decay", type=float, help=f"calcium decay time in s (default {d.tau_decay:g})")
    p.add_argument("--tau-rise", type=float, help=f"calcium rise time in s; 0 for AR(1) (default {d.tau_rise:g})")
    p.add_argument("--rate", type=float, help=f"mean spike event rate in Hz (default {d.spike_rate:g})")
    p.add_argument("--snr", type=float, help=f"median peak SNR of the neurons (default {d.peak_snr:g}); see "
                   "jaxcnmf.sim.SimParams.peak_snr for the definition")
    p.add_argument("--noise", choices=("gaussian", "poisson-gaussian"), help=f"noise model (default {d.noise})")
    p.add_argument("--motion", type=float, help="rigid motion jitter, standard deviation in pixels (default 0)")
    p.add_argument("--dendrites", action="store_true", help="thin branching processes instead of somata")
    p.add_argument("--background-rank", type=int, choices=(1, 2), help=f"background rank (default "
                   f"{d.background_rank})")
    p.add_argument("--neuropil", type=float, help=f"neuropil intensity as a fraction of the background level; 0 "
                   f"disables it (default {d.neuropil:g})")
    p.add_argument("--background-level", type=float, help=f"mean background intensity, which sets the movie's "
                   f"intensity scale (default {d.background_level:g})")
    p.add_argument("--offset", type=float, help="constant added to every pixel (default 0)")
    p.add_argument("--uint16", action="store_true",
                   help="round to integers, clip to 0..65535 and write uint16 (default: float32)")
    p.set_defaults(run=run)


def _check_output(path: str) -> None:
    """Raise `ParameterError` before any work when the movie path has an extension we cannot write."""
    base = path
    head, sep, _ = path.rpartition(":")
    if sep and head.lower().endswith(_H5_EXTS):
        base = head
    ext = os.path.splitext(base)[1].lower()
    if ext not in _MOVIE_EXTS + _H5_EXTS:
        raise ParameterError(f"cannot write a movie to {path!r} (extension {ext or '(none)'!r}); use "
                             ".tif/.tiff, .npy or file.h5:/dataset")
    folder = os.path.dirname(os.path.abspath(base))
    if not os.path.isdir(folder):
        raise ParameterError(f"the folder {folder!r} of -o {path!r} does not exist; create it first")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The `SimParams` overrides the command line asks for (unset options keep the defaults)."""
    kw = {field: getattr(args, opt) for opt, field in _KNOBS.items() if getattr(args, opt) is not None}
    kw["shape"] = (args.height, args.width)
    if args.dendrites:
        kw["mode"] = "dendrite"
    if args.uint16:
        kw["quantize"] = True
    return kw


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import save_movie
    from ..sim import _summary, save_truth, simulate, truth_path_for

    _check_output(args.output)
    movie, truth = simulate(seed=args.seed, **overrides_from_args(args))
    if args.uint16:
        movie = movie.astype(np.uint16)
    written = save_movie(args.output, movie) or args.output
    truth_path = save_truth(truth_path_for(args.output), truth)
    s = _summary(truth)
    snr = "n/a" if s["median_peak_snr"] is None else f"{s['median_peak_snr']:.2f}"
    print(f"wrote {written} ({s['frames']} frames of {s['height']}x{s['width']}, {movie.dtype})")
    print(f"wrote {truth_path} ({s['components']} components: {s['cells']} "
          f"{'processes' if args.dendrites else 'neurons'}; {s['background']} background; median peak SNR {snr})")
    n_clipped = truth.params.get("n_clipped", 0)
    if n_clipped:
        print(f"warning: {n_clipped} samples were clipped to the uint16 range; raise --offset to avoid it")
    return 0
