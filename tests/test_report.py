"""The HTML report: contents, embedded PNGs, the CLI, and the page rendered in a real headless browser (chromium)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402

from _plot_fixtures import small_fit  # noqa: E402

from jaxcnmf.cli import main  # noqa: E402
from jaxcnmf.io import save_result  # noqa: E402
from jaxcnmf.report import write_report  # noqa: E402

DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A result file, its movie and a report written by the CLI (with PNGs)."""
    d = tmp_path_factory.mktemp("report")
    result, movie, _ = small_fit()
    save_result(d / "result.h5", result)
    np.save(d / "movie.npy", movie)
    rc = main(["report", str(d / "result.h5"), "--movie", str(d / "movie.npy"), "-o", str(d / "report.html"),
               "--png-dir", str(d / "png")])
    assert rc == 0
    return d, result, movie


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(page)]


def test_report_embeds_every_figure_and_the_fit_summary(files):
    d, result, _ = files
    page = (d / "report.html").read_text()
    pngs = embedded_pngs(page)
    assert len(pngs) == page.count("<img ") == 6  # contours x2, traces, quality, background, residual
    for png in pngs:
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.05  # a real picture
    written = sorted(os.listdir(d / "png"))
    assert written == sorted(f"{n}.png" for n in ("contours", "contours_mean", "traces", "quality", "background",
                                                   "residual"))
    assert sorted((d / "png" / n).read_bytes() for n in written) == sorted(pngs)
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    for label, value in [("components", 4), ("accepted", 3), ("rejected", 1), ("frames", 200), ("min_snr", 2.5),
                         ("noise", "0.50 s"), ("total", "4.00 s")]:
        assert re.search(rf"<th>{label}</th><td[^>]*>{re.escape(str(value))}</td>", page), label
    assert page.count("<tr><td") == result.n_components  # the component table


def test_report_without_movie_says_what_it_skipped(tmp_path):
    result, _, _ = small_fit(T=60)
    path = write_report(tmp_path / "r.html", result)
    page = open(path).read()
    assert len(embedded_pngs(page)) == 4  # contours over footprints, traces, quality, background
    assert "No movie was given" in page and 'id="residual"' not in page


def test_report_cli_checks_inputs_before_writing(files, tmp_path, capsys):
    d, _, movie = files
    out = tmp_path / "bad.html"
    np.save(tmp_path / "short.npy", movie[:50])
    assert main(["report", str(d / "result.h5"), "--movie", str(tmp_path / "short.npy"), "-o", str(out)]) == 2
    assert "differs from the result" in capsys.readouterr().err and not out.exists()
    assert main(["report", str(tmp_path / "missing.h5"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert main(["report", str(d / "result.h5"), "--n-traces", "0", "-o", str(out)]) == 2
    assert not out.exists() and os.listdir(tmp_path) == ["short.npy"]  # no temporary left behind


def chromium(args: list[str], tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(os.listdir(tmp_path))}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


IMAGE_PROBE = """<script>window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", imgs.length + "/" + ok);
});</script></body>"""


def loaded_images(page_path, tmp_path) -> tuple[int, int]:
    """(images, images loaded) as the browser sees them, via a load-time probe script and --dump-dom."""
    probe = tmp_path / f"probe_{os.path.basename(page_path)}"
    probe.write_text(open(page_path).read().replace("</body>", IMAGE_PROBE))
    out = chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    m = re.search(r'data-images="(\d+)/(\d+)"', out.stdout)
    assert m, f"the probe did not run: {out.stderr[-2000:]}"
    return int(m[1]), int(m[2])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_all_images(files, tmp_path):
    d, _, _ = files
    shot = tmp_path / "shot.png"
    out = chromium([f"--screenshot={shot}", "--window-size=1200,3000", (d / "report.html").as_uri()], tmp_path)
    assert shot.exists(), out.stderr[-2000:]
    img = mpimg.imread(shot)
    assert img.shape[:2] == (3000, 1200)
    rgb = img[..., :3]
    assert rgb.std() > 0.1  # not blank
    assert (rgb.mean(axis=2) < 0.5).mean() > 0.03  # text and figures, not an empty white page
    assert len(np.unique((rgb[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50  # colour figures
    assert loaded_images(d / "report.html", tmp_path) == (6, 6)
    broken = tmp_path / "broken.html"  # the probe can fail: a corrupt image is not counted as loaded
    broken.write_text((d / "report.html").read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    assert loaded_images(broken, tmp_path) == (6, 5)
