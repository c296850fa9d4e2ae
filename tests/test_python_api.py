"""The README's "From Python" examples, run as written except for where the sites are, how many
rounds and the small profile (real Ray simulations, started from this process)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import fedreid
from reid import backbones
from reid.saved_model import ModelFileError

pytestmark = pytest.mark.ray
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    """The Python code blocks of the README's "From Python" section, in order."""
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def example_for(code: str, sites: Path, tmp_path: Path) -> str:
    """A README example with the tiny sites, one round and the small profile."""
    assert 'sites="data/synthetic", rounds=20' in code
    return code.replace('sites="data/synthetic", rounds=20',
                        f'sites="{sites}", rounds=1, profile="test", generate=False, '
                        f'output_dir="{tmp_path / "outputs"}", flwr_home="{tmp_path / "flwr-home"}"')


def run_example(code: str, sites: Path, tmp_path: Path) -> dict:
    """Execute one README example on small sites for one round, in this process; returns its namespace."""
    code = example_for(code, sites, tmp_path)
    namespace: dict = {"__name__": "__main__"}  # as in a notebook or a script: the factory lives in __main__
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


def copy_sites(tiny_sites: Path, tmp_path: Path) -> Path:
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    return sites


COLOURED = {"FORCE_COLOR": "1", "CLICOLOR_FORCE": "1", "TERM": "xterm-color"}  # what Jupyter kernels set


@pytest.fixture(scope="module")
def notebook_run(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's three-line example, executed in a real Jupyter kernel (nbclient + ipykernel) with
    the colour settings kernels have; one round on the tiny sites. Returns the cell's outputs, the
    run folder and the sites."""
    import nbformat
    from nbclient import NotebookClient

    base = tmp_path_factory.mktemp("notebook")
    sites = copy_sites(tiny_sites, base)
    code = readme_examples()[0]
    assert len(code.strip().splitlines()) == 3
    cells = [nbformat.v4.new_code_cell("import os; print('FORCE_COLOR=' + os.environ.get('FORCE_COLOR', ''))"),
             nbformat.v4.new_code_cell(example_for(code, sites, base))]
    notebook = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True).execute(
        cwd=str(base), env={**os.environ, **COLOURED})
    (folder,) = (base / "outputs").iterdir()
    return {"outputs": [cell.outputs for cell in notebook.cells], "run_dir": folder, "sites": sites}


def _text(output: dict) -> str:
    return str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))


def test_the_three_line_example_runs_in_a_jupyter_kernel_with_its_progress_bar(notebook_run: dict) -> None:
    environment, outputs = notebook_run["outputs"]
    assert "FORCE_COLOR=1" in _text(environment[0])  # the kernel runs with colours forced
    assert not [o for o in outputs if o["output_type"] == "error"], [o for o in outputs if o["output_type"] == "error"]
    printed = "".join(_text(o) for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")
    assert "'site': '0-mall'" in printed and "'site': '2-campus'" in printed  # print(result.table)
    bars = [o for o in outputs if "fedreid-progress" in str(o.get("data", {}).get("text/html", ""))]
    assert len(bars) == 1  # one display, updated in place as rounds finish
    assert re.search(r"fedpav: 1/1 rounds, \d+ s, round 1: mAP [\d.]+%", _text(bars[0])), _text(bars[0])
    result = fedreid.load_run(notebook_run["run_dir"])
    assert [row["site"] for row in result.table] == ["0-mall", "1-station", "2-campus"]
    assert all(0 <= row["mAP"] <= 100 and row["identities"] > 0 for row in result.table)


def test_each_site_model_is_the_global_shared_weights_plus_its_own_batchnorm_statistics(notebook_run: dict) -> None:
    result = fedreid.load_run(notebook_run["run_dir"])
    assert result.model is not None and set(result.site_models) == {"0-mall", "1-station", "2-campus"}
    glob = torch.load(result.model, weights_only=True)
    assert glob["info"]["batchnorm"] == "missing" and glob["info"]["round"] == 1
    assert glob["info"]["mAP"] == pytest.approx(result.history[-1]["evaluate"]["mean"]["mAP"])
    shared = glob["state_dict"]
    assert not any(k.endswith("running_mean") for k in shared)  # the server never learnt them
    means = {}
    for site, path in result.site_models.items():
        saved = torch.load(path, weights_only=True)
        state, info = saved["state_dict"], saved["info"]
        assert info["site"] == site and info["batchnorm"] == "own"
        assert info["mAP"] == pytest.approx(result.history[-1]["evaluate"]["sites"][site]["mAP"])
        assert all(torch.equal(state[k], v) for k, v in shared.items())  # the global SHARED weights
        extra = set(state) - set(shared)
        assert extra and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in extra)
        means[site] = state["bottleneck.1.running_mean"]
    assert not torch.equal(means["0-mall"], means["1-station"])  # each site's own statistics


def readme_usage() -> tuple[list[list[str]], str]:
    """The commands and the Python block of the README's "Using the trained model" section."""
    section = README.read_text().split("## Using the trained model", 1)[1].split("\n## ", 1)[0]
    (commands,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (python,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [shlex.split(line) for line in commands.strip().splitlines()], python


def _console_script(name: str) -> Callable[[], None]:
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == name]
    return entry.load()


def test_using_the_trained_model_as_the_readme_says(notebook_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The section's three commands (their installed entry points, with its arguments) and its Python
    lines, on the notebook run's output: the numbers are the federation's, the page and the graph work."""
    run, sites = notebook_run["run_dir"], notebook_run["sites"]
    commands, python = readme_usage()
    assert [c[0] for c in commands] == ["fedreid-eval", "fedreid-search", "fedreid-export"]
    monkeypatch.chdir(tmp_path)
    place = {"outputs/<run>": str(run), "data/synthetic": str(sites)}

    def local(argument: str) -> str:
        for written, real in place.items():
            argument = argument.replace(written, real)
        return argument

    outputs = []
    for command in commands:
        monkeypatch.setattr(sys, "argv", [command[0], *map(local, command[1:])])
        _console_script(command[0])()
        outputs.append(capsys.readouterr())
    federation = fedreid.load_run(run).history[-1]["evaluate"]["sites"]["0-mall"]
    for key, label in (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("mAP", "mAP"), ("mINP", "mINP")):
        assert re.search(rf"^\s+{label}\s+{100 * federation[key]:.2f}%$", outputs[0].out, flags=re.M), \
            (label, federation[key], outputs[0].out)
    assert (tmp_path / "search.html").is_file() and (tmp_path / "search.png").is_file()
    assert "first valid hit is the right person" in outputs[1].out
    assert "wrote mall.onnx" in outputs[2].out
    import onnxruntime

    site_model = run / "site-models" / "0-mall.pt"
    model = fedreid.load_model(site_model, device="cpu")
    session = onnxruntime.InferenceSession("mall.onnx", providers=["CPUExecutionProvider"])
    batch = model.preprocess(sites / "0-mall" / "query")
    exported = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert abs(exported - model.embed(batch, flip=False)).max() <= 1e-4
    code = local(python)
    assert str(site_model) in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own lines
    ranking, queries = namespace["ranking"], len(list((sites / "0-mall" / "query").iterdir()))
    assert ranking.indices.shape == (queries, 10) and (ranking.distances[:, 1:] >= ranking.distances[:, :-1]).all()
    assert str(ranking.indices[0]) in capsys.readouterr().out


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
    # Its model.pt loads here, where the README's network is registered, and is refused, naming the fix,
    # where it is not (a model file carries no code).
    model = fedreid.load_model(result.model, device="cpu")
    assert model.info.backbone_source == "registered" and model.embed(sites / "0-mall" / "query").shape[1] == 512
    registered = backbones._REGISTRY.pop("tiny_cnn")  # this process as one where it was never registered
    try:
        with pytest.raises(ModelFileError) as refused:
            fedreid.load_model(result.model, device="cpu")
    finally:
        backbones._REGISTRY["tiny_cnn"] = registered
    assert "trained with backbone 'tiny_cnn'" in str(refused.value) and "model files carry no code" in str(refused.value)
    assert "fedreid.register_backbone('tiny_cnn', factory)" in str(refused.value)


def test_mistakes_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(fedreid.RunFolderError, match="no metrics.jsonl"):
        fedreid.load_run(tmp_path)
    with pytest.raises(fedreid.FedReIDError, match="fedpav_typo"):
        fedreid.simulate("fedpav_typo", tmp_path, profile="test", generate=False)
    with pytest.raises(fedreid.FedReIDError, match="unknown backbone 'resnet5000'"):
        fedreid.simulate("fedpav", tmp_path, profile="test", overrides={"model.backbone": "resnet5000"})
    with pytest.raises(fedreid.FedReIDError, match="does not exist"):
        fedreid.simulate("fedpav", tmp_path / "nowhere", profile="test", generate=False)
