"""FedUReID end to end, 2 rounds: on the Ray engine (`fedreid-sim`) and as a TLS deployment with real
processes (`fedreid-server`, `fedreid-client`). One site holds unlabelled crops only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clients.kept import CLUSTERS_KEY, PROGRESS_KEY, record_from_bytes
from tests.deployment import Deployment
from tests.test_simulation_e2e import _run_folder, _simulate

SITES = ("0-mall", "1-station", "2-campus")
QUICK = "algorithm.unsupervised.epochs_first=2 algorithm.unsupervised.epochs_later=1"


def _with_unlabelled_campus(tiny_sites: Path, root: Path) -> Path:
    """The three sites, the campus's training crops renamed so that no name carries an identity."""
    shutil.copytree(tiny_sites, root)
    for index, path in enumerate(sorted((root / "2-campus" / "train").iterdir())):
        path.rename(path.with_name(f"frame{index:05d}-box.jpg"))
    return root


def _rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_fedureid_simulation_clusters_every_site_and_evaluates(tiny_sites: Path, tmp_path: Path) -> None:
    sites = _with_unlabelled_campus(tiny_sites, tmp_path / "sites")
    result = _simulate(sites, tmp_path, "--algorithm", "fedureid", "--overrides", QUICK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = _run_folder(tmp_path)
    rounds = _rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["train"]["sites"]) == set(SITES) and not record["train"]["rejected"]
        assert record["train"]["aggregated"]
    first, second = (r["train"]["sites"] for r in rounds)
    for site in SITES:
        images = first[site]["num-examples"]
        assert first[site]["epochs"] <= 2 and second[site]["epochs"] == 1
        # personalized merging over 2 rounds: one merge, straight to images / 8 clusters
        assert first[site]["clusters"] == second[site]["clusters"] == max(1, round(images / 8))
        assert first[site]["image-passes"] >= second[site]["image-passes"] > 0
    assert "cluster-nmi" in first["0-mall"] and "cluster-nmi" not in first["2-campus"]  # no names to compare with
    assert set(rounds[-1]["evaluate"]["sites"]) == set(SITES)
    assert "clusters |" in (folder / "results.md").read_text()


def test_fedureid_deployment_keeps_each_sites_clusters_on_its_own_disk(tiny_sites: Path, tmp_path: Path) -> None:
    root = _with_unlabelled_campus(tiny_sites, tmp_path / "sites")
    deployment = Deployment(tmp_path, {"0-mall": root / "0-mall", "2-campus": root / "2-campus"})
    outputs = tmp_path / "outputs"
    try:
        deployment.start_server()
        assert all(r.startswith("registered") for r in deployment.register_sites().values())
        deployment.start_client("0-mall")
        deployment.start_client("2-campus", None, "--images-per-identity", "4")  # the campus's own estimate
        deployment.wait_for_nodes(2)
        run_id = deployment.submit(f'algorithm="fedureid" profile="test" output-dir="{outputs}" '
                                   f'overrides="{QUICK}"')
        status = deployment.wait_finished(run_id, timeout=600)
        logs = "\n".join(deployment.log(n)[-2500:] for n in ("server.log", "client-0-mall.log", "client-2-campus.log"))
        assert status == "finished:completed", logs
    finally:
        deployment.close()

    folder = next(p for p in outputs.iterdir() if p.is_dir())
    rounds = _rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    final = rounds[-1]["train"]["sites"]
    assert final["0-mall"]["clusters"] == max(1, round(final["0-mall"]["num-examples"] / 8))
    assert final["2-campus"]["clusters"] == max(1, round(final["2-campus"]["num-examples"] / 4))
    assert set(rounds[-1]["evaluate"]["sites"]) == {"0-mall", "2-campus"}
    for site in ("0-mall", "2-campus"):
        (state_file,) = (tmp_path / "site-state" / site).glob("*.state")
        state = record_from_bytes(state_file.read_bytes())
        labels = state[CLUSTERS_KEY]["labels"].numpy()
        assert len(labels) == final[site]["num-examples"] and labels.max() + 1 == final[site]["clusters"]
        assert int(state[PROGRESS_KEY]["rounds-trained"]) == 2
