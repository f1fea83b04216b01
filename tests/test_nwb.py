"""NWB export: a round trip through pynwb keeps every array, shape, rate and column; bad input fails before writing."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from _plot_fixtures import small_fit

from jaxcnmf.errors import MovieError, ParameterError
from jaxcnmf.nwb import export_nwb


@pytest.fixture(scope="module")
def fitted():
    return small_fit(T=120)


def test_round_trip_keeps_shapes_values_and_metadata(fitted, tmp_path):
    pynwb = pytest.importorskip("pynwb")
    result, movie, _ = fitted
    np.save(tmp_path / "movie.npy", movie)
    os.makedirs(tmp_path / "out")
    path = export_nwb(result, tmp_path / "out" / "fit.nwb", movie_path=tmp_path / "movie.npy", indicator="GCaMP6f",
                      location="V1", excitation_lambda=920.0, experimenter=["A. Researcher"])
    assert pynwb.validate(path=str(path)) == []  # schema-valid
    K, T = result.C.shape
    with pynwb.NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        ophys = nwb.processing["ophys"]
        cells = ophys["ImageSegmentation"]["PlaneSegmentation"]
        masks = np.asarray(cells["image_mask"].data)
        assert masks.shape == (K, *result.sn.shape)
        np.testing.assert_array_equal(masks, np.asarray(result.A))
        np.testing.assert_array_equal(np.asarray(cells["accepted"].data), np.asarray(result.accepted))
        np.testing.assert_array_equal(np.asarray(cells["center"].data), np.asarray(result.centers))
        np.testing.assert_array_equal(np.asarray(cells["g"].data), np.asarray(result.g))
        np.testing.assert_array_equal(np.asarray(cells["snr"].data), np.asarray(result.snr))
        for container, name in (("Fluorescence", "C"), ("Fluorescence", "YrA"), ("Deconvolved", "S")):
            series = ophys[container][name]
            assert series.data.shape == (T, K) and series.rate == 20.0 and series.unit == "a.u."
            np.testing.assert_array_equal(np.asarray(series.data), np.asarray(getattr(result, name)).T)
            assert list(series.rois.data[:]) == list(range(K)) and series.rois.table is cells
        f = ophys["Background"]["f"]
        np.testing.assert_array_equal(np.asarray(f.data), np.asarray(result.f).T)
        np.testing.assert_array_equal(np.asarray(f.rois.table["image_mask"].data), np.asarray(result.b))
        assert "calcium jump" in ophys["Deconvolved"]["S"].description  # the units of S are documented in the file
        images = ophys["SummaryImages"].images
        np.testing.assert_array_equal(np.asarray(images["sn"].data), np.asarray(result.sn))
        np.testing.assert_allclose(np.asarray(images["mean"].data), movie.mean(0), rtol=1e-5)
        assert images["correlation"].data.shape == result.sn.shape
        movie_link = nwb.acquisition["TwoPhotonSeries"]
        assert list(movie_link.external_file[:]) == [os.path.join("..", "movie.npy")]  # relative to the NWB file
        assert movie_link.num_samples == T and movie_link.rate == 20.0
        plane = nwb.imaging_planes["ImagingPlane"]
        assert plane.indicator == "GCaMP6f" and plane.location == "V1" and plane.excitation_lambda == 920.0
        assert json.loads(nwb.notes)["params"]["min_snr"] == 2.5
        assert list(nwb.experimenter) == ["A. Researcher"]


def test_accepted_only_and_fps_override(fitted, tmp_path):
    pynwb = pytest.importorskip("pynwb")
    result, _, _ = fitted
    path = export_nwb(result, tmp_path / "acc.nwb", fps=7.5, accepted_only=True)
    with pynwb.NWBHDF5IO(str(path), "r") as io:
        ophys = io.read().processing["ophys"]
        keep = np.flatnonzero(np.asarray(result.accepted))
        np.testing.assert_array_equal(np.asarray(ophys["ImageSegmentation"]["PlaneSegmentation"]["image_mask"].data),
                                      np.asarray(result.A)[keep])
        assert ophys["Deconvolved"]["S"].data.shape == (result.C.shape[1], len(keep))
        assert ophys["Fluorescence"]["C"].rate == 7.5


def test_bad_input_fails_before_writing(fitted, tmp_path):
    result, movie, _ = fitted
    no_fps = type(result)(**{k: getattr(result, k) for k in ("A", "C", "S", "b", "f", "sn", "g", "YrA")})
    with pytest.raises(ParameterError, match="fps"):
        export_nwb(no_fps, tmp_path / "a.nwb")
    with pytest.raises(ParameterError, match="fps=-1"):
        export_nwb(result, tmp_path / "a.nwb", fps=-1)
    with pytest.raises(ParameterError, match=r"\.nwb"):
        export_nwb(result, tmp_path / "a.h5")
    np.save(tmp_path / "short.npy", movie[:10])
    with pytest.raises(MovieError, match="differs from the result"):
        export_nwb(result, tmp_path / "a.nwb", movie_path=tmp_path / "short.npy")
    assert os.listdir(tmp_path) == ["short.npy"]


def test_missing_pynwb_names_the_extra(fitted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynwb", None)
    with pytest.raises(ImportError, match=r"jaxcnmf\[nwb\]"):
        export_nwb(fitted[0], tmp_path / "a.nwb")
