"""Loaders for the real spike-inference ground truth in ../shared/data (cascade .mat, spikefinder CSV), and scoring.

Used by experiments/bench_spikes_real.py. Data are read in place (never copied); each recording comes back as a
trace with its frame times and its true spike times, so both inferred and true spikes can be binned on one time grid.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SPIKEFINDER_SETS = {"4": "OGB-1", "5": "GCaMP6s", "6": "GCaMP5k"}
SPIKEFINDER_FPS = 100.0


@dataclass(frozen=True)
class Recording:
    """One neuron's trace and its ground truth.

    `y` (T,) the fluorescence (dF/F) trace; `t` (T,) frame times in seconds; `spikes` true spike times in seconds;
    `fps` frames per second; `name` where it came from.
    """

    name: str
    y: np.ndarray
    t: np.ndarray
    spikes: np.ndarray
    fps: float


def _ravel(x) -> np.ndarray:
    """Flatten a MATLAB field that may be wrapped in (nested) object arrays."""
    a = np.asarray(x)
    while a.dtype == object:
        parts = [np.ravel(np.asarray(v)) for v in np.ravel(a)]
        a = np.concatenate(parts) if parts else np.zeros(0)
    return np.ravel(a).astype(np.float64)


def cascade_sets(root: Path = DATA / "cascade") -> list[Path]:
    """The cascade data-set folders (DS*), sorted."""
    return sorted(p for p in root.glob("DS*") if p.is_dir())


def load_cascade(folder: Path) -> list[Recording]:
    """Every recording (one per `CAttached` record) of a cascade data set; NaN samples are dropped.

    **Returns:** list of `Recording`, fps from the median frame interval.
    """
    from scipy.io import loadmat

    recs = []
    for f in sorted(folder.glob("*.mat")):
        for i, r in enumerate(loadmat(str(f))["CAttached"][0]):
            t, y = _ravel(r["fluo_time"]), _ravel(r["fluo_mean"])
            keep = np.isfinite(t) & np.isfinite(y)
            t, y = t[keep], y[keep]
            spikes = _ravel(r["events_AP"]) / 1e4
            if y.size < 100:
                continue
            fps = 1.0 / float(np.median(np.diff(t)))
            recs.append(Recording(f"{f.stem}[{i}]", y, t, spikes[np.isfinite(spikes)], fps))
    return recs


def _read_columns(path: Path) -> list[np.ndarray]:
    """Columns of a spikefinder CSV (first row a header), each with its trailing NaN padding removed."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    table = np.array([[float(v) if v.strip() else np.nan for v in row] for row in rows[1:]], np.float64)
    cols = []
    for j in range(table.shape[1]):
        col = table[:, j]
        finite = np.flatnonzero(np.isfinite(col))
        cols.append(col[: finite[-1] + 1] if finite.size else col[:0])
    return cols


def load_spikefinder(dataset: str, root: Path = DATA / "spikefinder") -> list[Recording]:
    """Training neurons of spikefinder set `dataset` ("4", "5" or "6"), 100 Hz; true spikes are counts per frame,
    returned as repeated spike times at the frame centres."""
    calcium = _read_columns(root / f"{dataset}.train.calcium.csv")
    counts = _read_columns(root / f"{dataset}.train.spikes.csv")
    recs = []
    for j, (y, n) in enumerate(zip(calcium, counts)):
        T = min(y.size, n.size)
        y, n = y[:T], np.nan_to_num(n[:T])
        if np.isnan(y).any():  # interior gaps: keep the leading finite run
            T = int(np.argmax(np.isnan(y)))
            y, n = y[:T], n[:T]
        t = np.arange(T) / SPIKEFINDER_FPS
        spikes = np.repeat(t, np.round(n).astype(int))
        recs.append(Recording(f"spikefinder{dataset}[{j}]", y, t, spikes, SPIKEFINDER_FPS))
    return recs


def bin_width(fps: float, bin_s: float = 0.04) -> float:
    """Scoring bin: `bin_s` (40 ms), or one frame interval where frames are slower than that."""
    return max(bin_s, 1.0 / fps)


def binned(rec: Recording, s: np.ndarray, bin_s: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Inferred activity `s` (per frame) and the true spike counts, summed in the same bins of `bin_width` seconds.

    Frames are assigned to a bin by their time stamp; the grid starts at the first frame and stops at the last one.
    """
    width = bin_width(rec.fps, bin_s)
    t0 = rec.t[0] - 0.5 / rec.fps
    n_bins = int(np.floor((rec.t[-1] + 0.5 / rec.fps - t0) / width))
    edges = t0 + width * np.arange(n_bins + 1)
    frame_bin = np.clip(((rec.t - t0) / width).astype(int), 0, n_bins - 1)
    est = np.bincount(frame_bin, weights=np.asarray(s, np.float64), minlength=n_bins)[:n_bins]
    true = np.histogram(rec.spikes, bins=edges)[0].astype(np.float64)
    return est, true


def spike_correlation(rec: Recording, s: np.ndarray, bin_s: float = 0.04) -> float:
    """Pearson correlation of inferred and true spikes in common bins (NaN when either is constant)."""
    est, true = binned(rec, s, bin_s)
    if est.std() == 0 or true.std() == 0:
        return float("nan")
    return float(np.corrcoef(est, true)[0, 1])


def all_sets() -> list[tuple[str, list[Recording]]]:
    """(name, recordings) for every available data set: the 5 cascade sets then spikefinder 4, 5, 6."""
    out = [(p.name, load_cascade(p)) for p in cascade_sets()]
    sf = DATA / "spikefinder"
    for k, indicator in SPIKEFINDER_SETS.items():
        if (sf / f"{k}.train.calcium.csv").exists():
            out.append((f"spikefinder{k}-{indicator}", load_spikefinder(k)))
    return out
