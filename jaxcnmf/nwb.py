"""Export a fit to Neurodata Without Borders (NWB 2), the format DANDI and other neuroscience archives expect.

It sits after the fit, next to `io.save_result`: footprints become an ImageSegmentation, traces RoiResponseSeries in an
`ophys` processing module. pynwb is imported only here (the `nwb` extra: `pip install jaxcnmf[nwb]`).

Layout written (names are fixed so other tools can find them):

- `processing/ophys/ImageSegmentation/PlaneSegmentation`: one row per component; `image_mask` is the footprint `A[k]`
  `(H, W)` in the movie's own axis order (rows, columns; unit l2 norm, as in the `Result`), plus the columns
  `accepted`, `snr`, `r_value`, `center` (row, col), `g` (AR coefficients), `baseline`, `c1`, `lam` when the result
  holds them.
- `processing/ophys/ImageSegmentation/Background`: one row per background component, `image_mask = b[i]`.
- `processing/ophys/Fluorescence/C`: denoised calcium `(T, K)` (NWB stores time first), `YrA` residual traces, so the
  raw trace of component k is `C + YrA`.
- `processing/ophys/Deconvolved/S`: spikes `(T, K)`: the AR innovation `s_t = c_t - sum_j g_j c_{t-j}`, i.e. the jump
  of calcium each frame, in the SAME units as `C` (not spike counts: divide by a single spike's jump to estimate them).
- `processing/ophys/Background/f`: background traces `(T, nb)`.
- `processing/ophys/SummaryImages`: `sn` (noise sd per pixel), and `mean`, `correlation` when the movie is given.
- `acquisition/TwoPhotonSeries`: an external link to the movie file when `movie_path` is given.
- All series have `rate = fps` and unit "a.u." (the movie's intensity units per unit-norm footprint); the fit's
  parameters are stored as JSON in the file's `notes`.
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from typing import Any

import numpy as np

from .errors import ParameterError
from .result import Result

NWB_HINT = "install pynwb with `pip install jaxcnmf[nwb]` (or `pip install pynwb`)"
UNIT = "a.u."
C_DESCRIPTION = ("denoised calcium C of each ROI (jaxcnmf), in movie intensity units per unit-l2-norm footprint; "
                 "baseline removed")
YRA_DESCRIPTION = "residual traces YrA (jaxcnmf): the raw trace of ROI k is C + YrA, same units as C"
S_DESCRIPTION = ("deconvolved activity S (jaxcnmf): the AR innovation s_t = c_t - sum_j g_j c_(t-j), the calcium jump "
                 "each frame, same units as C (not spike counts)")
F_DESCRIPTION = "background traces f (jaxcnmf); the movie is modelled as A C + b f + noise"
PER_COMPONENT_COLUMNS = {
    "accepted": "whether the fit's acceptance rule keeps the component",
    "snr": "trace signal-to-noise ratio",
    "r_value": "spatial correlation of the component with the movie",
    "centers": "footprint centre of mass (row, col) in pixels",
    "g": "AR coefficients of the calcium kinetics (per frame)",
    "baseline": "constant baseline removed from the raw trace",
    "c1": "initial calcium value at frame 0",
    "lam": "sparsity weight of the deconvolution",
}


def _import_pynwb():
    try:
        import pynwb
    except ImportError as e:
        raise ImportError(f"NWB export needs pynwb, which is not installed: {NWB_HINT}") from e
    return pynwb


def _check_fps(result: Result, fps: Any) -> float:
    fps = result.params.get("fps") if fps is None else fps
    if fps is None:
        raise ParameterError("fps: the frame rate is not known (the fit was run without fps); NWB needs it: pass "
                             "fps=<Hz>")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) or not np.isfinite(fps) \
            or fps <= 0:
        raise ParameterError(f"fps={fps!r}: expected a positive frame rate in Hz")
    return float(fps)


def _check_inputs(result: Result, path: Any, movie_path: Any, fps: Any):
    if not isinstance(result, Result):
        raise ParameterError(f"result: expected a jaxcnmf Result (from fit or load_result), got "
                             f"{type(result).__name__}")
    if not str(path).lower().endswith(".nwb"):
        raise ParameterError(f"path '{path}': NWB files end in .nwb; choose a name like 'session.nwb'")
    rate = _check_fps(result, fps)
    source = None
    if movie_path is not None:
        from .io import open_movie
        from .plot import _check_movie_matches

        source = open_movie(movie_path, check=False)
        _check_movie_matches(source.shape, result, "NWB export of the movie link")
    return rate, source


def _components(result: Result, accepted_only: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    arr = result.arrays()
    keep = np.arange(result.n_components)
    if accepted_only and "accepted" in arr:
        keep = np.flatnonzero(arr["accepted"])
    return arr, keep


def build_nwbfile(
    result: Result,
    *,
    fps: float | None = None,
    movie_path: str | os.PathLike | None = None,
    link_path: str | None = None,
    session_description: str = "calcium imaging analysed with jaxcnmf (CNMF)",
    identifier: str | None = None,
    session_start_time: datetime.datetime | None = None,
    device: str = "microscope",
    device_description: str = "unknown (set device=..., device_description=...)",
    indicator: str = "unknown",
    excitation_lambda: float = float("nan"),
    emission_lambda: float = float("nan"),
    location: str = "unknown",
    imaging_plane_description: str = "imaging plane of the fitted movie",
    accepted_only: bool = False,
    summary_images: bool = True,
    **nwbfile_kw,
):
    """Build (without writing) the `pynwb.NWBFile` of a fit; see the module docstring for the layout.

    **Arguments:** as for `export_nwb` (`link_path` is the movie path as the NWB file should record it).

    **Returns:** a `pynwb.NWBFile`.
    """
    rate, source = _check_inputs(result, "x.nwb", movie_path, fps)
    pynwb = _import_pynwb()
    from pynwb.base import Images
    from pynwb.image import GrayscaleImage
    from pynwb.ophys import Fluorescence, ImageSegmentation, OpticalChannel, RoiResponseSeries, TwoPhotonSeries

    arr, keep = _components(result, accepted_only)
    T, H, W = result.shape
    start = session_start_time or datetime.datetime.now(datetime.timezone.utc)
    notes = json.dumps({"jaxcnmf_version": result.version, "params": result.params}, default=str)
    nwb = pynwb.NWBFile(session_description=session_description, identifier=identifier or str(uuid.uuid4()),
                        session_start_time=start, notes=notes, **nwbfile_kw)
    dev = nwb.create_device(name=device, description=device_description)
    channel = OpticalChannel(name="OpticalChannel", description="emission channel", emission_lambda=emission_lambda)
    plane = nwb.create_imaging_plane(
        name="ImagingPlane", optical_channel=channel, description=imaging_plane_description, device=dev,
        excitation_lambda=excitation_lambda, imaging_rate=rate, indicator=indicator, location=location,
    )
    if source is not None:
        nwb.add_acquisition(TwoPhotonSeries(
            name="TwoPhotonSeries", imaging_plane=plane, external_file=[link_path or os.fspath(movie_path)],
            format="external", starting_frame=[0], num_samples=T, rate=rate, unit=UNIT,
            description=f"the fitted movie, {T} frames of {H}x{W} pixels (rows x columns), stored externally",
        ))
    ophys = nwb.create_processing_module(name="ophys", description=f"CNMF fit by jaxcnmf {result.version}".strip())
    seg = ImageSegmentation(name="ImageSegmentation")
    ophys.add(seg)

    cells = seg.create_plane_segmentation(name="PlaneSegmentation", imaging_plane=plane,
                                          description="jaxcnmf footprints A (unit l2 norm), axes (rows, columns)")
    for name, desc in PER_COMPONENT_COLUMNS.items():
        if name in arr:
            cells.add_column(name=name if name != "centers" else "center", description=desc)
    for k in keep:
        cells.add_roi(image_mask=arr["A"][k], **{(n if n != "centers" else "center"): arr[n][k]
                                                   for n in PER_COMPONENT_COLUMNS if n in arr})
    back = seg.create_plane_segmentation(name="Background", imaging_plane=plane,
                                         description="jaxcnmf background footprints b, axes (rows, columns)")
    for b in arr["b"]:
        back.add_roi(image_mask=b)

    def series(name, data, table, n, description):
        region = table.create_roi_table_region(region=list(range(n)), description=f"the rows of {table.name}")
        return RoiResponseSeries(name=name, data=np.ascontiguousarray(data.T), rois=region, unit=UNIT, rate=rate,
                                 starting_time=0.0, description=description)

    K = len(keep)
    for container, rows in (("Fluorescence", [("C", arr["C"][keep], cells, K, C_DESCRIPTION),
                                              ("YrA", arr["YrA"][keep], cells, K, YRA_DESCRIPTION)]),
                            ("Deconvolved", [("S", arr["S"][keep], cells, K, S_DESCRIPTION)]),
                            ("Background", [("f", arr["f"], back, len(arr["b"]), F_DESCRIPTION)])):
        fl = Fluorescence(name=container)
        ophys.add(fl)  # in the file before its series, so each series' ROI region shares an ancestor with its table
        for row in rows:
            fl.add_roi_response_series(series(*row))
    images = [GrayscaleImage(name="sn", data=arr["sn"], description="noise standard deviation of each pixel")]
    if source is not None and summary_images:
        from .plot import local_correlation_image, mean_image

        images += [GrayscaleImage(name="mean", data=mean_image(source), description="temporal mean of the movie"),
                   GrayscaleImage(name="correlation", data=local_correlation_image(source),
                                  description="mean correlation of each pixel with its 8 neighbours")]
    ophys.add(Images(name="SummaryImages", images=images, description="summary images of the fitted movie"))
    return nwb


def export_nwb(
    result: Result,
    path: str | os.PathLike,
    *,
    movie_path: str | os.PathLike | None = None,
    fps: float | None = None,
    session_description: str = "calcium imaging analysed with jaxcnmf (CNMF)",
    **kw,
) -> str:
    """Write a fit as an NWB file (atomically): segmentation, traces, spikes, background, summary images.

    **Arguments:**

    - `result`: a `Result`.
    - `path`: the `.nwb` file to write.
    - `movie_path`: the fitted movie; when given, it is linked (as an external `TwoPhotonSeries`, path relative to the
      NWB file) and its mean and correlation images are stored. Its shape must be the result's.
    - `fps`: frame rate in Hz (default: the fit's `params['fps']`; required one way or the other).
    - `session_description`: NWB session description.
    - `**kw`: metadata passed to `build_nwbfile`: `identifier`, `session_start_time` (default now, UTC), `device`,
      `device_description`, `indicator` (e.g. "GCaMP6f"), `excitation_lambda`, `emission_lambda` (nm; NaN when
      unknown), `location` (brain area), `imaging_plane_description`, `accepted_only` (export only accepted
      components), `summary_images`, and any `pynwb.NWBFile` keyword (`experimenter`, `lab`, `institution`,
      `session_id`, ...).

    **Returns:** the path written (str). Raises `ParameterError` (no fps, bad path, wrong movie shape) or `MovieError`
    before writing anything; `ImportError` naming the `nwb` extra when pynwb is missing.
    """
    from .io import atomic_output

    _check_inputs(result, path, movie_path, fps)
    pynwb = _import_pynwb()
    link = None
    if movie_path is not None:
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        link = os.path.relpath(os.path.abspath(os.fspath(movie_path)), folder)
    nwb = build_nwbfile(result, fps=fps, movie_path=movie_path, link_path=link,
                        session_description=session_description, **kw)
    with atomic_output(path) as tmp:
        with pynwb.NWBHDF5IO(tmp, "w") as io:
            io.write(nwb)
    return os.fspath(path)
