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


@pytest.fixture(scope="module")
def run(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[fedreid.RunResult, Path]:
    """A two-round run in which one site has no gallery, and its sites."""
    tmp_path = tmp_path_factory.mktemp("browser")
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    shutil.rmtree(sites / "1-station" / "gallery")  # one site fails: the page must say which and why
    result = fedreid.simulate("fedpav", sites, rounds=2, profile="test", output_dir=tmp_path / "outputs",
                              overrides={"federation.eval_every": 1}, generate=False, flwr_home=tmp_path / "flwr-home")
    return result, sites


def test_a_real_runs_report_renders_with_its_table_figure_and_incidents(run: tuple[fedreid.RunResult, Path]) -> None:
    result, _ = run
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


def test_a_sites_search_page_renders_its_ranked_lists_with_coloured_frames(run: tuple[fedreid.RunResult, Path],
                                                                          tmp_path: Path) -> None:
    """fedreid-search with the mall's own model of that run, on its own cameras."""
    from reid.apps.search import main as search
    from reid.search_page import COLOURS, MATCH, WRONG

    result, sites = run
    out = tmp_path / "search.html"
    search(["--model", str(result.site_models["0-mall"]), "--query", str(sites / "0-mall" / "query"),
            "--gallery", str(sites / "0-mall" / "gallery"), "--top-k", "8", "--out", str(out)])
    dom = chromium("--dump-dom", out.resolve().as_uri()).stdout
    queries = len(list((sites / "0-mall" / "query").iterdir()))
    assert dom.count("<section class=\"query\"") == queries and dom.count("data-rank=") == 8 * queries
    assert "<script" not in dom and "same person, other camera" in dom
    shot = SCREENSHOT.with_name("search-screenshot.png")
    chromium("--window-size=1100,900", f"--screenshot={shot.resolve()}", out.resolve().as_uri())
    colours = {rgb for _, rgb in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20) or []}
    assert COLOURS[MATCH] in colours and COLOURS[WRONG] in colours, "the green and red frames did not render"
    print(f"\nscreenshot: {shot.resolve()}")
