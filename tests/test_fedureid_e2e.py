"""FedUReID end to end, 2 rounds, as a TLS deployment with real processes (`fedreid-server`,
`fedreid-client`); one site holds unlabelled crops only. The simulation path is the same `Site` behind
Flower's ClientApp (clients/app.py, exercised by every simulation test); one FedUReID run pays for both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clients.kept import CLUSTERS_KEY, PROGRESS_KEY, record_from_bytes
from server import submit
from tests.deployment import Deployment

QUICK = "algorithm.unsupervised.epochs_first=2 algorithm.unsupervised.epochs_later=1"


def _with_unlabelled_campus(tiny_sites: Path, root: Path) -> Path:
    """The three sites, the campus's training crops renamed so that no name carries an identity."""
    shutil.copytree(tiny_sites, root)
    for index, path in enumerate(sorted((root / "2-campus" / "train").iterdir())):
        path.rename(path.with_name(f"frame{index:05d}-box.jpg"))
    return root


def _rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fedureid_deployment_keeps_each_sites_clusters_on_its_own_disk(tiny_sites: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Submitted as an operator submits, with `fedreid-submit` (server/submit.py) over TLS: it waits for
    both sites, streams the run's log, exits 0 once the SuperLink reports the run completed and prints
    the per-site table."""
    root = _with_unlabelled_campus(tiny_sites, tmp_path / "sites")
    deployment = Deployment(tmp_path, {"0-mall": root / "0-mall", "2-campus": root / "2-campus"})
    outputs = tmp_path / "outputs"
    try:
        deployment.start_server()
        assert all(r.startswith("registered") for r in deployment.register_sites().values())
        deployment.start_client("0-mall")
        deployment.start_client("2-campus", None, "--images-per-identity", "4")  # the campus's own estimate
        code = submit.main(["--superlink", f"127.0.0.1:{deployment.control_port}", "--ca",
                            str(deployment.certs / "ca.crt"), "--sites", "2", "--wait", "120", "--run-config",
                            f'algorithm="fedureid" profile="test" output-dir="{outputs}" overrides="{QUICK}"'])
        printed = capsys.readouterr().out
        logs = "\n".join(deployment.log(n)[-2500:] for n in ("server.log", "client-0-mall.log", "client-2-campus.log"))
        assert code == 0, printed[-3000:] + logs
    finally:
        deployment.close()

    folder = next(p for p in outputs.iterdir() if p.is_dir())
    assert "round 1/2 trained" in printed and "round 2/2 trained" in printed  # the ServerApp's log, streamed
    assert "| 2-campus |" in printed and f"outputs: {folder}" in printed
    rounds = _rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["train"]["sites"]) == {"0-mall", "2-campus"} and not record["train"]["rejected"]
        assert record["train"]["aggregated"]
    first, final = (r["train"]["sites"] for r in rounds)
    for site in ("0-mall", "2-campus"):
        assert first[site]["epochs"] <= 2 and final[site]["epochs"] == 1
        assert first[site]["clusters"] == final[site]["clusters"]  # personalised merging: one merge, then kept
        assert first[site]["image-passes"] >= final[site]["image-passes"] > 0
    assert "cluster-nmi" in first["0-mall"] and "cluster-nmi" not in first["2-campus"]  # no names to compare with
    assert "clusters |" in (folder / "results.md").read_text()
    assert final["0-mall"]["clusters"] == max(1, round(final["0-mall"]["num-examples"] / 8))
    assert final["2-campus"]["clusters"] == max(1, round(final["2-campus"]["num-examples"] / 4))
    assert set(rounds[-1]["evaluate"]["sites"]) == {"0-mall", "2-campus"}
    for site in ("0-mall", "2-campus"):
        (state_file,) = (tmp_path / "site-state" / site).glob("*.state")
        state = record_from_bytes(state_file.read_bytes())
        labels = state[CLUSTERS_KEY]["labels"].numpy()
        assert len(labels) == final[site]["num-examples"] and labels.max() + 1 == final[site]["clusters"]
        assert int(state[PROGRESS_KEY]["rounds-trained"]) == 2
