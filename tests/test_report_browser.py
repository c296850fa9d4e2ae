"""report.html as a person sees it: a real run's page rendered by headless Chromium (Debian's
``chromium``). Run by ``make test-browser``, not by ``make test``; the screenshot is kept for a look."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import fedreid

pytestmark = [pytest.mark.browser, pytest.mark.ray]
SCREENSHOT = Path(os.environ.get("FEDREID_SCREENSHOT", "outputs/report-screenshot.png"))
TAB_BLUE = (31, 119, 180)  # the first site's line in metrics.png; nothing else on the page is this colour


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "headless Chromium is needed: `make test-browser` installs Debian's chromium package"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def test_a_real_runs_report_renders_with_its_table_figure_and_incidents(tiny_sites: Path, tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    shutil.rmtree(sites / "1-station" / "gallery")  # one site fails: the page must say which and why
    result = fedreid.simulate("fedpav", sites, rounds=2, profile="test", output_dir=tmp_path / "outputs",
                              overrides={"federation.eval_every": 1}, generate=False, flwr_home=tmp_path / "flwr-home")
    page = result.report.resolve().as_uri()

    dom = chromium("--dump-dom", page).stdout
    for text in ("<td>0-mall</td>", "<td>2-campus</td>", "Bytes per training round", "missing gallery folder",
                 "data:image/png;base64,"):
        assert text in dom, text
    assert "<script" not in dom

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    chromium("--window-size=1280,1400", f"--screenshot={SCREENSHOT.resolve()}", page)
    image = Image.open(SCREENSHOT).convert("RGB")
    assert image.size == (1280, 1400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours and len(colours) > 200  # text, tables and a chart, not a blank or error page
    assert any(rgb == TAB_BLUE for _, rgb in colours), "the embedded figure did not render"
    print(f"\nscreenshot: {SCREENSHOT.resolve()}")
