"""The presets end to end on the Ray engine (real `flwr run`, real files), three simulations side by
side: `feddg` and `local` for one round and an evaluation, `fedklpr_compressed` for two rounds of
pruning. The options combine, so one run takes three paths together: `feddg` with CDW weights and
KD (`fedpav_cdw_kd`'s two halves) on top; every preset file is composed and checked in
tests/test_config.py, and clustering's grouping of real site models in tests/test_clustering.py.
The one-round runs also have a fourth site held out (`federation.held_out`): it must never be sent
a training message and must be ranked in every evaluation (`unseen`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import onnxruntime
import pytest
import torch

import fedreid

from reid.data.synthetic import DEFAULT_STYLES, generate_site
from reid.export import export_model
from tests.test_simulation_e2e import REPO, _simulation_command

pytestmark = pytest.mark.ray  # Ray's simulation engine: left out by `make gpu-check`
PRESETS = ["feddg", "local"]  # one round, with a held-out site
OVERRIDES = {"feddg": "algorithm.weighting=cdw algorithm.kd.enabled=true"}  # with fedpav_cdw_kd's options
PRUNED = "fedklpr_compressed"  # two rounds, pruned after each, the three training sites only
PRUNING = ("federation.rounds=2 algorithm.pruning.start_round=1 algorithm.pruning.start_accuracy=0 "
           "algorithm.pruning.ramp_rounds=2 algorithm.pruning.schedule=linear algorithm.pruning.target=0.7")
SITES = {"0-mall", "1-station", "2-campus"}
HELD_OUT = "3-airport"


@pytest.fixture(scope="module")
def runs(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run each preset once on the same sites (and public images), all three at once from this one
    checkout, each with the Flower home and SuperLink port `fedreid-sim` gives every run: each must
    complete with its own results. Map preset -> run folder."""
    base = tmp_path_factory.mktemp("presets")
    public = base / "public"
    # KD's public images: one batch of 24, enough to distil on; each batch costs seconds on 2 cores
    generate_site(public, 99, seed=4, style=replace(DEFAULT_STYLES[3], num_train_ids=2, num_test_ids=0,
                                                     num_distractors=0, num_junk=0))
    held_out = base / "held-out"
    generate_site(held_out, 3, seed=5, style=replace(DEFAULT_STYLES[3], num_train_ids=6, num_test_ids=6,
                                                       num_distractors=2, num_junk=1))
    started = {}
    for preset in [*PRESETS, PRUNED]:
        work = base / preset
        shutil.copytree(tiny_sites, work / "sites")
        if preset == PRUNED:
            extra = ["--overrides", PRUNING]
        else:
            shutil.copytree(held_out, work / "sites" / HELD_OUT)
            extra = ["--public-root", str(public), "--sites", "4", "--overrides",
                     f"federation.rounds=1 federation.held_out=[{HELD_OUT}] {OVERRIDES.get(preset, '')}"]
        command = _simulation_command(work / "sites", work, "--algorithm", preset, *extra, own_home=False)
        log = (work / "sim.log").open("w")
        started[preset] = (subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True), log)
    folders = {}
    for preset, (process, log) in started.items():
        code = process.wait(timeout=900)
        log.close()
        output = (base / preset / "sim.log").read_text()
        assert code == 0, f"{preset}:\n{output[-5000:]}"
        (folder,) = (base / preset / "outputs").iterdir()
        assert f"outputs: {folder}" in output  # its own run, not another's
        folders[preset] = folder
    return folders


def _rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_evaluates_and_reports_every_site(runs: dict[str, Path], preset: str) -> None:
    (line,) = _rounds(runs[preset])
    assert line["round"] == 1
    assert set(line["train"]["sites"]) == SITES and not line["train"]["rejected"]
    assert set(line["evaluate"]["sites"]) == SITES
    assert "after round 1" in (runs[preset] / "results.md").read_text()


def test_cdw_weights_follow_the_reported_distances(runs: dict[str, Path]) -> None:
    for line in _rounds(runs["feddg"]):
        sites = line["train"]["sites"]
        total = sum(s["cdw-distance"] for s in sites.values())
        for s in sites.values():
            assert s["weight"] == pytest.approx(s["cdw-distance"] / total)


def test_kd_sends_no_extra_bytes_and_shared_styles_are_counted(runs: dict[str, Path]) -> None:
    """KD runs every round and moves no bytes; feddg's uploads carry the same arrays as `local`'s
    plus one style row of 33 float32 numbers per camera: those bytes and some framing, far less
    than an image."""
    with_kd, plain = _rounds(runs["feddg"]), _rounds(runs["local"])  # local: the same arrays, no KD
    for styled, without in zip(with_kd, plain):
        assert styled["train"]["refined"] and not without["train"]["refined"]
        for site in SITES:
            sent = styled["train"]["bytes_per_site"][site]["sent"] - without["train"]["bytes_per_site"][site]["sent"]
            assert abs(sent) < 64, (site, sent)  # round 1: no style bank yet; config values vary by a few bytes
            up = styled["train"]["bytes_per_site"][site]["received"] - without["train"]["bytes_per_site"][site]["received"]
            style = styled["train"]["sites"][site]["style-bytes"]
            assert style % (33 * 4) == 0 and 2 <= style // (33 * 4) <= 5  # a row per camera
            assert style <= up < style + 1200 < 64 * 32 * 3, (site, up, style)  # the record, its metrics; an image
            assert styled["train"]["sites"][site]["restyled-images"] > 0


def test_local_baseline_keeps_every_site_on_its_own_model(runs: dict[str, Path]) -> None:
    for line in _rounds(runs["local"]):
        assert line["train"]["clusters"] == [[s] for s in sorted(SITES)]
    saved = torch.load(runs["local"] / "site_models.pt", weights_only=True)["state_dicts"]
    key = "bottleneck.0.weight"
    mall, station, campus = (saved[s][key] for s in sorted(SITES))
    assert not torch.equal(mall, station) and not torch.equal(station, campus)


def test_fedklpr_sites_agree_on_one_mask_and_compressed_pruned_changes_shrink_both_ways(
        runs: dict[str, Path]) -> None:
    """fedklpr_compressed for two rounds, the server pruning to 0.35 after round 1 and to 0.7 after
    round 2: in round 2 every site trains and uploads on the server's mask (overlap 1.0, the same kept
    fraction everywhere), the download of the pruned model's change and the uploads are a fraction of
    the dense ones, and it trains."""
    folder = runs[PRUNED]
    lines = _rounds(folder)
    pruning = [line["train"]["pruning"] for line in lines]
    assert [p["ratio"] for p in pruning] == pytest.approx([0.35, 0.7])  # no site holds back 20 identities:
    assert all(p["crr"] is None or not p["crr"]["judged"] for p in pruning)  # nothing to judge, no recovery
    assert pruning[1]["mask_overlap"] == 1.0
    fractions = {s: lines[1]["train"]["sites"][s]["kept-fraction"] for s in SITES}  # trained on round 1's mask
    assert len(set(fractions.values())) == 1 and fractions["0-mall"] == pytest.approx(0.65, abs=0.01), fractions
    dense = _rounds(runs["local"])[0]["train"]["bytes_per_site"]  # same sites, whole dense models both ways
    for site in SITES:
        down = [line["train"]["bytes_per_site"][site]["sent"] for line in lines]
        up = [line["train"]["bytes_per_site"][site]["received"] for line in lines]
        assert down[0] == pytest.approx(dense[site]["sent"], rel=0.01)  # round 1: nothing held yet, the whole model
        assert down[1] < 0.25 * dense[site]["sent"], (site, down)  # 8-bit change over the kept 65%, and the mask
        assert up[0] < 0.3 * dense[site]["received"] and up[1] < 0.2 * dense[site]["received"], (site, up)
    losses = [line["train"]["aggregate"]["train-loss"] for line in lines]
    assert losses[-1] < losses[0], losses  # compressed, pruned changes still train the model
    # A site's own model keeps the mask it evaluated with, exports to ONNX and embeds as PyTorch does.
    model = fedreid.load_model(folder / "site-models" / "0-mall.pt", device="cpu")
    assert model.info.kept_fraction == pytest.approx(0.3, abs=0.01)  # the final evaluation's model, at 0.7
    assert model.info.algorithm == "fedklpr_compressed" and model.info.round == 2
    session = onnxruntime.InferenceSession(str(export_model(model.net, "onnx", folder.parent / "pruned.onnx")),
                                           providers=["CPUExecutionProvider"])
    batch = model.preprocess(folder.parent.parent / "sites" / "0-mall" / "query")
    exported = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert abs(exported - model.embed(batch, flip=False)).max() <= 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_a_held_out_site_never_trains_and_is_ranked_at_every_evaluation(runs: dict[str, Path], preset: str) -> None:
    (line,) = _rounds(runs[preset])
    assert HELD_OUT not in line["train"]["bytes_per_site"]  # no training message was sent to it
    assert HELD_OUT not in line["train"]["sites"] and HELD_OUT not in line["evaluate"]["sites"]
    assert not line["unseen"]["failed"]
    ranked = {}
    for protocol in ("source-only", "target-adapted"):  # both, apart: the federation's BatchNorm statistics / AdaBN
        unseen = line["unseen"][protocol]
        assert set(unseen["sites"]) == {HELD_OUT}
        metrics = ranked[protocol] = unseen["sites"][HELD_OUT]
        assert 0 < metrics["mAP"] <= 1 and metrics["num-queries"] > 0
        assert unseen["mean"]["mAP"] == pytest.approx(metrics["mAP"])
        if preset == "local":  # each site's own model is tried there; the best one is reported
            by_model = metrics["mAP-by-model"]
            assert set(by_model) == SITES and metrics["model"] == max(by_model, key=by_model.get)
            assert metrics["mAP"] == max(by_model.values())
        else:
            assert metrics["model"] == "global" and "mAP-by-model" not in metrics
    assert ranked["source-only"]["mAP"] != ranked["target-adapted"]["mAP"]  # different statistics, different ranks
    table = (runs[preset] / "results.md").read_text()
    assert f"| {HELD_OUT} (held out, source-only)" in table and f"| {HELD_OUT} (held out, target-adapted)" in table
    assert HELD_OUT in (runs[preset] / "report.html").read_text()

