"""The fedreid9 preset end to end: fabricated miniatures of all nine original releases ->
fedreid-prepare -> a Flower simulation with one site per dataset -> per-site results for all nine.

Run by `make test-benchmark` (marker ``benchmark``), not by `make test`: nine sites cost ~45 s, and
`make test` covers each preparer (tests/test_prepare.py), the preset's composition
(tests/test_config.py) and simulations of three and four sites."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reid.data.prepare import prepare
from server.config import compose_config
from tests.fabricate import FABRICATORS

pytestmark = [pytest.mark.ray, pytest.mark.benchmark]  # Ray's engine: left out by `make gpu-check`
REPO = Path(__file__).resolve().parent.parent


def test_fedreid9_on_miniatures_of_all_nine_releases(tmp_path: Path) -> None:
    sites = list(compose_config({"profile": "fedreid9"}).benchmark.sites)
    assert sorted(sites) == sorted(FABRICATORS)
    for name in sites:
        FABRICATORS[name](tmp_path / "raw" / name)
        prepare(name, tmp_path / "raw" / name, tmp_path / "fedreid" / name)
    overrides = "model=small federation.rounds=1 federation.eval_at_start=false train.batch_size=4"
    done = subprocess.run(
        [sys.executable, "-m", "server.simulate", "--profile", "fedreid9", "--sites-root", str(tmp_path / "fedreid"),
         "--overrides", overrides, "--output-dir", str(tmp_path / "outputs"), "--flwr-home", str(tmp_path / "flwr")],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    folder = next((tmp_path / "outputs").iterdir())
    line = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["round"] == 1
    assert sorted(line["train"]["sites"]) == sorted(sites) and not line["train"]["rejected"]
    assert sorted(line["evaluate"]["sites"]) == sorted(sites)
    for metrics in line["evaluate"]["sites"].values():
        assert 0 < metrics["mAP"] <= 1 and 0 < metrics["mAP-market"] <= 1
    table = (folder / "results.md").read_text()
    assert all(f"| {name} |" in table for name in sites) and "mAP (Market)" in table
