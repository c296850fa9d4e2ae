"""The README's "From Python" examples, run as written except for where the sites are, how many
rounds and the small profile (real Ray simulations, started from this process)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    """The Python code blocks of the README's "From Python" section, in order."""
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_example(code: str, sites: Path, tmp_path: Path) -> dict:
    """Execute one README example on small sites for one round; returns its namespace."""
    assert 'sites="data/synthetic", rounds=20' in code
    code = code.replace('sites="data/synthetic", rounds=20',
                        f'sites="{sites}", rounds=1, profile="test", generate=False, '
                        f'output_dir="{tmp_path / "outputs"}", flwr_home="{tmp_path / "flwr-home"}"')
    namespace: dict = {"__name__": "__main__"}  # as in a notebook or a script: the factory lives in __main__
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


def copy_sites(tiny_sites: Path, tmp_path: Path) -> Path:
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    return sites


def test_the_three_line_example_runs_and_returns_the_table(tiny_sites: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_examples()[0]
    assert len(code.strip().splitlines()) == 3
    result = run_example(code, copy_sites(tiny_sites, tmp_path), tmp_path)["result"]
    assert [row["site"] for row in result.table] == ["0-mall", "1-station", "2-campus"]
    assert all(0 <= row["mAP"] <= 100 and row["identities"] > 0 for row in result.table)
    assert "'site': '0-mall'" in capsys.readouterr().out  # what print(result.table) shows


def test_a_registered_backbone_trains_one_simulated_round(tiny_sites: Path, tmp_path: Path) -> None:
    """The factory is defined here, in this process; the sites and the server run in others."""
    code = readme_examples()[1]
    assert "@fedreid.register_backbone" in code
    namespace = run_example(code, copy_sites(tiny_sites, tmp_path), tmp_path)
    result = namespace["result"]
    assert "backbone: tiny_cnn" in result.config_text
    shipped = tmp_path / "outputs" / "backbones" / "tiny_cnn.pkl"
    assert f"backbone_factory: {shipped}" in result.config_text and shipped.is_file()
    trained = [r for r in result.history if r.get("round") == 1 and r.get("train")]
    assert trained and trained[0]["train"]["aggregate"]["sites-accepted"] == 3, trained
    # The model the sites trained is the README's network: its conv shapes are in the checkpoint.
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert tuple(state["backbone.3.weight"].shape) == (64, 32, 3, 3)
    assert tuple(state["bottleneck.0.weight"].shape) == (512, 64)
    assert [row["site"] for row in result.table] == ["0-mall", "1-station", "2-campus"]
