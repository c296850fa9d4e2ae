"""The README's "From Python" examples, run as written except for where the sites are, how many
rounds and the small profile (real Ray simulations, started from this process)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

import fedreid

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


def test_a_registered_backbone_trains_and_a_broken_site_is_left_out(tiny_sites: Path, tmp_path: Path) -> None:
    """The README's own-backbone example: the factory is defined here, in this process; the sites and
    the server run in others. One site has no gallery: it is rejected with its reason, the others go on."""
    code = readme_examples()[1]
    assert "@fedreid.register_backbone" in code
    sites = copy_sites(tiny_sites, tmp_path)
    shutil.rmtree(sites / "1-station" / "gallery")
    result = run_example(code, sites, tmp_path)["result"]
    assert "backbone: tiny_cnn" in result.config_text
    shipped = tmp_path / "outputs" / "backbones" / "tiny_cnn.pkl"
    assert f"backbone_factory: {shipped}" in result.config_text and shipped.is_file()
    # The model the sites trained is the README's network: its conv shapes are in the checkpoint.
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert tuple(state["backbone.3.weight"].shape) == (64, 32, 3, 3)
    assert tuple(state["bottleneck.0.weight"].shape) == (512, 64)

    assert result.rounds == 1
    line = result.history[-1]
    assert set(line["train"]["sites"]) == {"0-mall", "2-campus"} and line["train"]["aggregate"]["sites-accepted"] == 2
    (reason,) = line["train"]["rejected"].values()
    assert "missing gallery folder" in reason and "1-station" in reason
    assert [row["site"] for row in result.table] == ["0-mall", "2-campus"]
    assert result.table[0]["mAP"] == pytest.approx(100 * line["evaluate"]["sites"]["0-mall"]["mAP"])
    report = result.report.read_text()  # the rejected site and its reason, for a person
    assert "<td>rejected</td><td><details><summary>missing gallery folder" in report
    assert fedreid.load_run(result.run_dir).history == result.history


def test_mistakes_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(fedreid.RunFolderError, match="no metrics.jsonl"):
        fedreid.load_run(tmp_path)
    with pytest.raises(fedreid.FedReIDError, match="fedpav_typo"):
        fedreid.simulate("fedpav_typo", tmp_path, profile="test", generate=False)
    with pytest.raises(fedreid.FedReIDError, match="unknown backbone 'resnet5000'"):
        fedreid.simulate("fedpav", tmp_path, profile="test", overrides={"model.backbone": "resnet5000"})
    with pytest.raises(fedreid.FedReIDError, match="does not exist"):
        fedreid.simulate("fedpav", tmp_path / "nowhere", profile="test", generate=False)
