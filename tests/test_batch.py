"""Many movies and many devices: `fit_many` equals separate fits, mismatched movies are refused before any work, and a
patch run spread over 2 (virtual CPU) devices gives the result of 1 device (in a subprocess, since the device count
must be set before JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _scale_movies import FPS, OVERLAP, PATCH, RADIUS, planted_movie

from jaxcnmf.batch import fit_many
from jaxcnmf.errors import MovieError, ParameterError

TESTS = Path(__file__).resolve().parent


def test_fit_many_checks_inputs_first():
    a = np.zeros((40, 48, 48), np.float32)
    with pytest.raises(MovieError, match=r"movies\[1\].*shape"):
        fit_many([a, np.zeros((40, 48, 40), np.float32)], RADIUS)
    with pytest.raises(MovieError, match=r"movies\[1\]"):
        fit_many([a, np.zeros((40, 48), np.float32)], RADIUS)
    with pytest.raises(ParameterError, match="movies"):
        fit_many([], RADIUS)
    with pytest.raises(ParameterError, match="devices"):
        fit_many([a + np.arange(40)[:, None, None]], RADIUS, devices=64)


@pytest.mark.slow
def test_fit_many_equals_separate_fits(tmp_path):
    from jaxcnmf.fit import fit

    movies = [planted_movie(seed=s)[0] for s in (6, 7)]
    many = fit_many(movies, RADIUS, fps=FPS, checkpoint_dir=str(tmp_path))
    assert len(many) == 2 and len([n for n in os.listdir(tmp_path) if n.endswith(".npz")]) == 2
    for movie, res in zip(movies, many):
        one = fit(movie, RADIUS, fps=FPS)
        assert one.n_components > 0
        for name, arr in one.arrays().items():
            np.testing.assert_array_equal(res.arrays()[name], arr, err_msg=name)


_DEVICE_SCRIPT = """
import json, sys
import numpy as np
import jax
sys.path.insert(0, {tests!r})
from _scale_movies import FPS, OVERLAP, PATCH, RADIUS, planted_movie
from jaxcnmf.patches import fit_patches
assert len(jax.devices()) == 2, jax.devices()
movie = planted_movie(seed=8)[0]
kw = dict(fps=FPS, patch_size=PATCH, overlap=OVERLAP)
one = fit_patches(movie, RADIUS, devices=1, **kw)
two = fit_patches(movie, RADIUS, devices=2, **kw)  # patches on 2 devices, whole-field passes sharded over 2
out = {{}}
for name, a in one.arrays().items():
    b = two.arrays()[name]
    same = a.shape == b.shape
    out[name] = float(np.max(np.abs(a.astype(float) - b)) / (np.max(np.abs(a)) + 1e-30)) if same else -1.0
out["K"] = [one.n_components, two.n_components]
print("RESULT" + json.dumps(out))
"""


def test_two_devices_give_the_one_device_result(tmp_path):
    script = tmp_path / "devices.py"
    script.write_text(textwrap.dedent(_DEVICE_SCRIPT.format(tests=str(TESTS))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    K = out.pop("K")
    assert K[0] > 0 and K[0] == K[1]
    assert all(v >= 0 for v in out.values()), out  # every array has the same shape
    # the same patches and the same statistics; sharding only reorders float32 sums over pixels: footprints, traces
    # and acceptance agree to float32 rounding; what the deconvolution derives from them (residual traces, sparsity
    # weights, snr) moves a little more, still far below any scientific difference
    assert out["accepted"] == 0.0, out
    for name in ("A", "C", "b", "f", "sn", "centers"):
        assert out[name] < 5e-3, (name, out)
    assert max(out.values()) < 5e-2, out
