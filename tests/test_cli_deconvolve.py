"""Tests of `jaxcnmf deconvolve`: .npy and .csv input (both layouts, NaN padding), output keys, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import lfilter

from jaxcnmf.cli import main
from jaxcnmf.cli.deconvolve import _is_header, read_csv_traces, read_traces, trace_lengths
from jaxcnmf.errors import TraceError
from jaxcnmf.noise import ar_to_tau, estimate_noise

T = 400
KEYS = {"c", "s", "b", "c1", "g", "sn", "lam", "lengths", "p"}


def traces(n=3, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.random((n, T)) < 0.04).astype(float)
    c = lfilter([1.0], [1.0, -0.9], s, axis=-1)
    return c + 0.2 * rng.normal(size=c.shape) + 1.0


def write_csv(path, rows, header=None):
    with open(path, "w") as fh:
        if header is not None:
            fh.write(",".join(header) + "\n")
        for r in rows:
            fh.write(",".join("" if np.isnan(v) else repr(float(v)) for v in r) + "\n")


def test_npy_with_padding(tmp_path, capsys):
    Y = traces()
    Y[1, 300:] = np.nan
    src, out = tmp_path / "tr.npy", tmp_path / "out.npz"
    np.save(src, Y.astype(np.float32))
    assert main(["deconvolve", str(src), "--p", "1", "--fps", "30", "-o", str(out)]) == 0
    d = np.load(out)
    assert KEYS | {"fps", "tau_decay", "tau_rise"} <= set(d.files)
    np.testing.assert_array_equal(d["lengths"], [T, 300, T])
    assert d["c"].shape == d["s"].shape == (3, T) and d["g"].shape == (3, 1)
    for k in ("b", "c1", "sn", "lam", "tau_decay"):
        assert d[k].shape == (3,) and np.all(np.isfinite(d[k]))
    assert np.all(np.isnan(d["c"][1, 300:])) and np.all(np.isfinite(d["c"][1, :300]))
    assert np.all(np.isfinite(d["s"][[0, 2]])) and np.all(d["s"][[0, 2]] >= -1e-6)
    np.testing.assert_allclose(d["sn"], np.asarray(estimate_noise(np.nan_to_num(Y), length=d["lengths"], method="mean")), rtol=1e-5)
    np.testing.assert_allclose(d["tau_decay"], np.asarray(ar_to_tau(d["g"], 30.0)[0]), rtol=1e-6)
    # the fit explains the trace: residual at the noise level, calcium tracks the data
    r = Y[0] - d["c"][0] - d["b"][0]
    assert np.sqrt(np.mean(r[20:] ** 2)) < 1.5 * d["sn"][0]
    out_text = capsys.readouterr().out
    assert "3 trace(s)" in out_text and "decay time" in out_text and str(out) in out_text


def test_csv_spikefinder_layout(tmp_path):
    Y = traces(seed=1)
    cols = Y.T.copy()
    cols[350:, 2] = np.nan  # the third neuron is shorter
    src, out = tmp_path / "cal.csv", tmp_path / "out.npz"
    write_csv(src, cols, header=["0", "1", "2"])
    assert main(["deconvolve", str(src), "--p", "1", "-o", str(out)]) == 0
    d = np.load(out)
    assert KEYS <= set(d.files) and "tau_decay" not in d.files
    np.testing.assert_array_equal(d["lengths"], [T, T, 350])
    assert d["c"].shape == (3, T) and np.all(np.isnan(d["s"][2, 350:]))


def test_csv_layouts_and_headers(tmp_path):
    Y = traces(n=2)
    rows_file, named = tmp_path / "rows.csv", tmp_path / "named.csv"
    write_csv(rows_file, Y)
    got, by_cols = read_csv_traces(str(rows_file))
    assert not by_cols and got.shape == (2, T)
    np.testing.assert_allclose(got, Y)
    write_csv(named, Y.T, header=["cell_a", "cell_b"])
    got, by_cols = read_csv_traces(str(named))
    assert by_cols and got.shape == (2, T)
    np.testing.assert_allclose(got, Y)
    got, by_cols = read_csv_traces(str(named), layout="rows")
    assert got.shape == (T, 2)
    assert _is_header(["0", "1", "2"]) and _is_header(["1", "2"]) and _is_header(["time", "3.5"])
    assert not _is_header(["0.5", "1.25", "2"]) and not _is_header(["3", "1", "2"])
    Y1, what = read_traces(str(rows_file), header="no", layout="columns")
    assert what == "column" and Y1.shape == (T, 2)


def test_trace_lengths_rules():
    Y = np.ones((3, 40))
    Y[1, 30:] = np.nan
    np.testing.assert_array_equal(trace_lengths(Y, "f"), [40, 30, 40])
    Y[2, 10] = np.nan
    with pytest.raises(TraceError, match="row 2 has NaN inside the trace at frame"):
        trace_lengths(Y, "f")
    Y = np.ones((2, 40))
    Y[0, 0] = np.nan
    with pytest.raises(TraceError, match="column 0 has NaN inside"):
        trace_lengths(Y, "f", "column")
    with pytest.raises(TraceError, match="row 1 has no finite values"):
        trace_lengths(np.array([[1.0] * 20, [np.nan] * 20]), "f")
    with pytest.raises(TraceError, match="at least"):
        trace_lengths(np.ones((1, 5)), "f")


def test_baseline_options(tmp_path, capsys):
    """Default: baseline estimated and kept >= 0; --free-baseline lets it go negative; --no-baseline fixes it at 0."""
    Y = traces(n=2) - 1.3  # resting level below 0
    src = tmp_path / "neg.npy"
    np.save(src, Y.astype(np.float32))
    outs = {}
    for flag in ("", "--free-baseline", "--no-baseline"):
        out = tmp_path / f"out{flag}.npz"
        assert main(["deconvolve", str(src), "--p", "1", "-o", str(out)] + ([flag] if flag else [])) == 0
        outs[flag] = np.load(out)
    text = capsys.readouterr().out
    assert "baseline estimated >= 0" in text and "either sign" in text and "baseline 0" in text
    np.testing.assert_array_equal(outs[""]["b"], 0)
    np.testing.assert_array_equal(outs["--no-baseline"]["b"], 0)
    assert np.all(outs["--free-baseline"]["b"] < -0.1)
    assert main(["deconvolve", str(src), "--no-baseline", "--free-baseline", "-o", str(tmp_path / "x.npz")]) == 2
    assert "contradict" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


def test_errors_are_clear_and_write_nothing(tmp_path, capsys):
    Y = traces(n=2)
    Y[1, 100] = np.nan
    src, out = tmp_path / "bad.npy", tmp_path / "out.npz"
    np.save(src, Y)
    assert main(["deconvolve", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "frame(s) 100" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b\n1,2\n3,x\n")
    assert main(["deconvolve", str(bad_csv), "-o", str(out)]) == 2
    assert "line 3, field 2" in capsys.readouterr().err
    assert main(["deconvolve", str(tmp_path / "missing.npy"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    txt = tmp_path / "t.txt"
    txt.write_text("1 2 3")
    assert main(["deconvolve", str(txt), "-o", str(out)]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert main(["deconvolve", str(src), "--tau-decay", "1.0", "-o", str(out)]) == 2
    assert "--fps" in capsys.readouterr().err
    assert main(["deconvolve", str(src), "-o", str(tmp_path / "out.h5")]) == 2
    assert ".npz" in capsys.readouterr().err
    assert not out.exists()
