"""Deployment on loopback with real processes: fedreid-server (SuperLink, TLS + SuperNode auth),
fedreid-client per site (SuperNode), fedreid-certs, and a run submitted with `flwr run`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch

import fedreid
from clients.answer_on_death import AnswerOnDeath
from clients.kept import LOCAL_STATE_KEY, record_from_bytes
from server.certs import create
from server.flower_cli import free_port
from tests.attack import image_fingerprints, leaked, stealing_app
from tests.deployment import Deployment
from tests.hostile_link import hostile_pythonpath


def _sites(tiny_sites: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(tiny_sites.iterdir()) if p.is_dir()}


def _run_folder(outputs: Path) -> Path:
    folders = [p for p in outputs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def _logs(deployment: Deployment) -> str:
    names = ["server.log", *[f"client-{s}.log" for s in deployment.sites]]
    return "\n".join(f"--- {n}\n{deployment.log(n)[-2500:]}" for n in names)


def test_tls_federation_names_sites_by_their_registered_keys_and_runs_only_installed_code(tiny_sites: Path,
                                                                                         tmp_path: Path) -> None:
    """TLS + SuperNode authentication decide who is who: an unregistered key is refused; a site that
    reports another name is counted under the name its key was registered with; a name registered
    for two keys is turned away on both; the rest of the federation completes.

    Before that, an attacker submits a copy of fedreid whose ClientApp returns the site's first
    training image: every site refuses it, saying why, and no stretch of any image file reaches the
    ServerApp, the SuperLink's database or its log."""
    sites = {name: path for name, path in _sites(tiny_sites).items() if name in ("0-mall", "1-station")}
    deployment = Deployment(tmp_path, sites)
    try:
        deployment.start_server()
        registered = deployment.register_sites()
        assert all(result.startswith("registered as node") for result in registered.values()), registered
        assert set(deployment.register_sites().values()) == {"already registered"}  # reruns are harmless

        # a key the SuperLink does not know: the SuperNode is refused and exits
        create(deployment.certs, [], ["intruder", "impostor"])
        deployment.sites = {**sites, "intruder": sites["0-mall"], "impostor": sites["0-mall"]}
        intruder = deployment.start_client("intruder", None, "--max-wait-time", "60")
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate" in deployment.log("client-intruder.log") or \
            "not registered" in deployment.log("client-intruder.log").lower(), deployment.log("client-intruder.log")

        # a second key registered under the mall's name, and a station box that calls itself campus
        done = deployment.connection.register(deployment.certs / "sites" / "impostor.pub", "0-mall")
        assert done.startswith("registered as node"), done
        deployment.start_client("impostor", None, "--dataset", "0-mall")
        deployment.start_client("0-mall")
        deployment.start_client("1-station", None, "--dataset", "2-campus")  # the last --dataset counts
        deployment.wait_for_nodes(3)
        received = tmp_path / "received-by-the-attacker.bin"
        attack = stealing_app(tmp_path / "attacker-app", received)
        stolen_outputs = tmp_path / "attack-outputs"
        attack_run = deployment.connection.submit(attack, f'profile="test" output-dir="{stolen_outputs}" '
                                                          'overrides="federation.rounds=1 federation.min_sites=1"')
        outputs = tmp_path / "outputs"  # the real run is submitted at once and runs beside the attack
        run_id = deployment.submit(f'profile="test" output-dir="{outputs}" '
                                   'overrides="federation.rounds=1 federation.min_sites=1"')
        assert deployment.wait_finished(attack_run, 300).startswith("finished"), _logs(deployment)
        status = deployment.wait_finished(run_id, 600)
        assert status == "finished:completed", _logs(deployment)
        run_log = deployment.run_log(run_id)
    finally:
        deployment.close()

    (attacked,) = _rounds(_run_folder(stolen_outputs))
    assert not attacked["train"]["sites"] and not attacked["train"]["aggregated"]
    for phase in ("train", "evaluate"):
        refusal = attacked[phase]["rejected"]["1-station"]
        assert "site '2-campus' refused app fedreid/fedreid" in refusal, refusal  # its node's own words
        assert "site code differs from the installed one in clients/app.py" in refusal
    for site in ("0-mall", "1-station", "impostor"):
        assert "refused a task: site" in deployment.log(f"client-{site}.log")
    assert received.read_bytes().count(b"REPLY\n") >= 6  # the attacker's server saw every reply it got
    seen_by_server = [received, *(tmp_path / "superlink-state").glob("superlink.db*"), tmp_path / "server.log"]
    prints = image_fingerprints([sites["0-mall"], sites["1-station"]])
    assert len(prints) > 100 and leaked(prints, seen_by_server) == []

    folder = _run_folder(outputs)
    (line,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert set(line["train"]["sites"]) == {"1-station"} and set(line["train"]["rejected"]) == {"0-mall"}
    assert "claimed by more than one node" in line["train"]["rejected"]["0-mall"]
    assert set(line["evaluate"]["sites"]) == {"1-station"}
    assert "claimed by more than one node" in line["evaluate"]["rejected"]["0-mall"]
    assert "registered as '1-station' but reports the name '2-campus'" in run_log
    assert "| 1-station |" in (folder / "results.md").read_text()
    assert (folder / "global_model.pt").stat().st_size > 1_000_000
    saved = list((tmp_path / "site-state" / "1-station").glob("*.state"))  # where a restarted box finds it
    assert [p.name for p in saved] == [f"{folder.name}.state"]
    # The site's own model stays on the site: the global SHARED weights plus its own BatchNorm statistics.
    own = torch.load(tmp_path / "site-state" / "1-station" / "models" / f"{folder.name}.pt", weights_only=True)
    kept = record_from_bytes(saved[0].read_bytes())[LOCAL_STATE_KEY].to_torch_state_dict()
    shared = torch.load(folder / "model.pt", weights_only=True)["state_dict"]
    assert own["info"]["mAP"] == pytest.approx(line["evaluate"]["sites"]["1-station"]["mAP"])
    assert all(torch.equal(own["state_dict"][k], v) for k, v in shared.items())
    statistics = [k for k in kept if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(own["state_dict"][k], kept[k]) for k in statistics)
    assert not (folder / "site-models").exists()  # nothing of it reaches the server

    result = fedreid.load_run(folder)  # a deployment's folder reads back as a simulation's does
    assert result.rounds == 1 and [row["site"] for row in result.table] == ["1-station"]
    assert result.table[0]["mAP"] == pytest.approx(100 * line["evaluate"]["sites"]["1-station"]["mAP"])
    assert result.checkpoint == folder / "global_model.pt" and "federation:" in result.config_text
    assert "claimed by more than one node" in result.report.read_text()  # the page names the turned-away site


def test_client_launcher_refuses_a_wrong_layout_before_connecting(tmp_path: Path, tiny_site: Path) -> None:
    broken = tmp_path / "site"
    shutil.copytree(tiny_site, broken)
    shutil.rmtree(broken / "query")
    done = subprocess.run([sys.executable, "-m", "clients.launch", "--server", "127.0.0.1:1", "--dataset", "x",
                           "--data-root", str(broken), "--insecure"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert str(broken) in done.stderr and "query" in done.stderr

    done = subprocess.run([sys.executable, "-m", "clients.launch", "--server", "127.0.0.1:1", "--dataset", "x",
                           "--data-root", str(tiny_site), "--ca", str(tmp_path / "missing.crt"),
                           "--key", str(tmp_path / "k")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing.crt" in done.stderr


def test_server_launcher_names_missing_certificates(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "server.launch", "--certs", str(tmp_path / "nothing"),
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "fedreid-certs create" in done.stderr and str(tmp_path / "nothing" / "ca.crt") in done.stderr


@pytest.mark.parametrize("sans", [["localhost", "127.0.0.1", "::1"]])
def test_certs_are_signed_by_the_ca_and_site_keys_load_as_flower_reads_them(tmp_path: Path, sans: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from server.certs import CertPaths, server_cert_sans

    written = create(tmp_path, sans, ["mall", "station"])
    assert len(written) == 8
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert sorted(server_cert_sans(CertPaths(tmp_path))) == sorted(sans)
    key = load_ssh_private_key((tmp_path / "sites" / "mall").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = load_ssh_public_key((tmp_path / "sites" / "mall.pub").read_bytes())
    assert public.public_numbers() == key.public_key().public_numbers()
    assert (tmp_path / "sites" / "mall").stat().st_mode & 0o077 == 0
    # a second call keeps everything and only adds the new site
    before = (tmp_path / "ca.crt").read_bytes()
    assert create(tmp_path, [], ["campus"]) == [tmp_path / "sites" / "campus", tmp_path / "sites" / "campus.pub"]
    assert (tmp_path / "ca.crt").read_bytes() == before
    with pytest.raises(ValueError, match="--force"):
        create(tmp_path, ["elsewhere"], [])
    with pytest.raises(ValueError, match="site name"):
        create(tmp_path, [], ["../evil"])


def _wait_for(condition: Callable[[], bool], what: str, deployment: Deployment, timeout: float = 300,
              poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{_logs(deployment)}")
        time.sleep(poll)


class ClientLogs:
    """What the sites have logged since the last ``mark()``."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.offsets: dict[str, int] = {}
        self.mark()

    def mark(self) -> None:
        self.offsets = {s: len(self.deployment.log(f"client-{s}.log")) for s in self.deployment.sites}

    def since_mark(self) -> str:
        return "".join(self.deployment.log(f"client-{s}.log")[self.offsets[s]:] for s in self.deployment.sites)


def _wait_for_round(folder_parent: Path, server_round: int, deployment: Deployment, timeout: float = 300) -> Path:
    """The run folder, once its metrics.jsonl holds a line for ``server_round``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for metrics in folder_parent.glob("*/metrics.jsonl"):
            if any(json.loads(line)["round"] == server_round for line in metrics.read_text().splitlines()):
                return metrics.parent
        time.sleep(1.0)
    raise AssertionError(f"round {server_round} never completed\n{_logs(deployment)}")


def _rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _scrape_after_round(port: int, server_round: int, timeout: float = 60) -> str:
    """The Prometheus page once it reports ``server_round`` (the gauges follow the metrics line)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            page = response.read().decode()
        if f"fedreid_round {float(server_round)}" in page or time.monotonic() > deadline:
            return page
        time.sleep(0.2)


def _worker_pids(deployment: Deployment, site: str) -> list[int]:
    """The site worker processes of ``site`` (found by the Runtime API port its fedreid-client gave it)."""
    found = subprocess.run(["pgrep", "-f", f"clients.worker --runtime-api 127.0.0.1:{deployment.runtime_ports[site]}"],
                           capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def _per_message_processes(deployment: Deployment) -> list[str]:
    """Flower's per-message processes (``flwr-clientapp``, and the ``flower-superexec`` that starts them)
    of this deployment's sites: a site worker leaves none."""
    ports = "|".join(f"127.0.0.1:{port}" for port in deployment.runtime_ports.values())
    found = subprocess.run(["pgrep", "-af", f"(flwr-clientapp|flower-superexec).*({ports})"], capture_output=True,
                           text=True, check=False)
    return found.stdout.splitlines()


def _fleet_bytes(deployment: Deployment, site: str) -> tuple[int, int]:
    """(received, sent) by ``site``'s SuperNode over its connections to the Fleet API, as the kernel
    counts them (TCP_INFO's bytes_received and bytes_acked, from ``ss``): TLS, HTTP/2 and gRPC framing,
    polls and the app bundle included."""
    found = subprocess.run(["pgrep", "-f", f"clients.supernode.*--port {deployment.runtime_ports[site]}"],
                           capture_output=True, text=True, check=False)
    pids = {int(pid) for pid in found.stdout.split()}
    assert pids, f"no SuperNode process for {site}"
    listing = subprocess.run(["ss", "-tinpH", "state", "established", "dst", f"127.0.0.1:{deployment.fleet_port}"],
                             capture_output=True, text=True, check=True).stdout
    received = sent = 0
    for block in re.split(r"\n(?=\S)", listing.strip()):
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", block)}
        if owners & pids:
            received += int(re.search(r"bytes_received:(\d+)", block).group(1)) if "bytes_received:" in block else 0
            sent += int(re.search(r"bytes_acked:(\d+)", block).group(1)) if "bytes_acked:" in block else 0
    return received, sent


HOSTILE = ("hostile-not-a-zip", "hostile-agent")  # tests/hostile_link.py's lies (bad TOML: test_hostile_server.py)


def _start_hostile_runs(deployment: Deployment, root: Path, pool: ThreadPoolExecutor) -> dict[str, Future]:
    """What a hostile server sends before the real run: an app bundle that is not a zip, a run
    described as an agent app, and 100,000 local epochs, each to both sites (min_sites=2: submitted
    while the sites start, they wait for both). A future of the run ids by name, under "all"."""
    overrides = {lie: "" for lie in HOSTILE} | {"oversized": " train.local_epochs=100000"}

    def submit(name: str) -> int:
        return deployment.submit(f'profile="test" output-dir="{root / name}" overrides="'
                                 f'federation.rounds=1 federation.min_sites=2{overrides[name]}"')

    def submit_all() -> dict[str, int]:
        # Flower 1.39's SuperExec installs a run's FAB into one folder per hash; two ServerApps of the same
        # FAB starting together can find it half-written ("Cannot find pyproject.toml"). The first run's
        # ServerApp installs it alone; the others start once its run folder exists.
        first, *rest = overrides
        runs = {first: submit(first)}
        deadline = time.monotonic() + 120
        while not (root / first).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return runs | {name: submit(name) for name in rest}

    return {"all": pool.submit(submit_all)}


def _wait_all_finished(deployment: Deployment, runs: dict[str, int], timeout: float = 300) -> None:
    """Each run ends (the sites answer every message with an error); one list of runs a poll for all."""
    deadline, statuses = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        statuses = {int(r["run-id"]): str(r["status"]) for r in deployment.connection.runs() if "run-id" in r}
        if all(statuses.get(run, "").startswith("finished") for run in runs.values()):
            ended = {name: statuses[run] for name, run in runs.items()}
            assert set(ended.values()) == {"finished:completed"}, f"{ended}{_logs(deployment)}"  # no ServerApp crashed
            return
        time.sleep(0.5)
    raise AssertionError(f"hostile runs {runs} did not all end: {statuses}{_logs(deployment)}")


def _check_hostile_runs(deployment: Deployment, runs: dict[str, int], root: Path, sites: dict[str, Path]) -> None:
    for site in sites:
        log = deployment.log(f"client-{site}.log")
        assert log.count("its app bundle could not be read (BadZipFile)") >= 2, log[-4000:]  # train, evaluate
        assert "runs flwr-clientapp tasks only" in log and "a flwr-agentapp task" in log
        assert "train.local_epochs=100000 exceeds this site's limit of 20 epochs (--max-epochs)" in log
        assert "SuperNode stopped receiving" not in log  # answered, not restarted: the loop never ended
    (line,) = _rounds(_run_folder(root / "oversized"))
    for reason in line["train"]["rejected"].values():  # the server is told why, and nothing of the site
        assert "exceeds this site's limit of 20 epochs (--max-epochs)" in reason, line
    recorded = [deployment.log("server.log").encode(), *(p.read_bytes() for p in (root / "superlink-state").glob("*.db*")),
                *(p.read_bytes() for lie in runs for p in (root / lie).rglob("*.jsonl"))]  # the database holds run logs
    for data in recorded:
        assert str(root / "site-state").encode() not in data
        assert not any(str(path).encode() in data for path in sites.values())


def _check_private_files(deployment: Deployment, state_root: Path) -> None:
    """Nothing a site keeps is readable by other users of its box: its folder 0700, every file 0600."""
    assert "was open to other users (mode 755); it is now 700" in deployment.log("client-0-mall.log")
    for folder in state_root.iterdir():
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.parent.parent.name == "image-cache" for p in files) and list(folder.glob("models/*.pt"))
        wide = [(p.relative_to(folder), oct(stat.S_IMODE(p.stat().st_mode))) for p in files
                if stat.S_IMODE(p.stat().st_mode) & 0o077]
        assert wide == [], wide


def test_a_site_worker_killed_mid_round_fails_that_round_and_a_restarted_box_rejoins_with_its_head(
        tiny_sites: Path, tmp_path: Path) -> None:
    """Campus's site worker is killed (SIGKILL) while it trains round 2: fedreid-client starts it again,
    the new worker answers for the lost task at once, and round 2 is aggregated from the mall alone,
    naming campus as failed. Then the whole campus box restarts between rounds (the ServerApp is held
    after round 2 until it is connected) and rejoins round 3 with the head it saved. No
    flwr-clientapp process is ever started: the workers run every task.

    The run uses compressed updates: campus, which missed round 2, gets the whole model in round 3
    while the mall gets a change; and the bytes the kernel counted on the mall's Fleet connection
    are the bytes metrics.jsonl reports for it, plus the framing, polls and app bundle."""
    sites = {name: path for name, path in _sites(tiny_sites).items() if name in ("0-mall", "2-campus")}
    deployment = Deployment(tmp_path, sites)
    outputs, port, marker = tmp_path / "outputs", free_port(), tmp_path / "paused"
    overrides = (f"federation.rounds=3 federation.min_sites=1 federation.round_timeout_s=120 "
                 f"telemetry.prometheus_port={port}")
    clientapps = []
    mall_state = tmp_path / "site-state" / "0-mall"
    mall_state.mkdir(parents=True)
    mall_state.chmod(0o755)  # left open to other users by hand: the site tightens it
    pythonpath = os.pathsep.join(filter(None, [hostile_pythonpath(tmp_path / "hostile"), os.environ.get("PYTHONPATH")]))
    try:
        deployment.start_server(env={"FEDREID_TEST_PAUSE": "recorded:2", "FEDREID_TEST_PAUSE_MARKER": str(marker),
                                     "PYTHONPATH": pythonpath})
        assert all(r.startswith("registered") for r in deployment.register_sites().values())
        with ThreadPoolExecutor(len(HOSTILE) + 1) as pool:
            submitted = _start_hostile_runs(deployment, tmp_path, pool)
            for site in sites:
                deployment.start_client(site)
            deployment.wait_for_nodes(2)
            hostile = submitted["all"].result()
        _wait_all_finished(deployment, hostile)
        counted_before = _fleet_bytes(deployment, "0-mall")
        run_id = deployment.submit(f'algorithm="fedpav_compressed" profile="test" output-dir="{outputs}" '
                                   f'overrides="{overrides}"')
        folder = _wait_for_round(outputs, 1, deployment)
        scraped = _scrape_after_round(port, 1)
        (worker,) = _worker_pids(deployment, "2-campus")
        in_progress = AnswerOnDeath(tmp_path / "site-state" / "2-campus")
        _wait_for(lambda: _rounds(folder)[-1]["round"] == 1 and in_progress.phase() == AnswerOnDeath.RUNNING,
                  "campus working on round 2", deployment, poll=0.01)
        os.kill(worker, signal.SIGKILL)  # dies while round 2 trains
        _wait_for(marker.exists, "the end of round 2", deployment)
        restarted = _worker_pids(deployment, "2-campus")
        assert len(restarted) == 1 and restarted[0] != worker
        _wait_for(lambda: deployment.log("client-2-campus.log").count("site worker ready") == 2,
                  "the restarted worker", deployment)
        deployment.stop_client("2-campus")  # then the whole box goes down and comes back, sharing its cores
        deployment.start_client("2-campus", None, "--cpu-threads", "1")
        deployment.wait_for_nodes(2)
        clientapps = _per_message_processes(deployment)
        marker.unlink()  # round 3 may start
        status = deployment.wait_finished(run_id, 600)
        assert status == "finished:completed", _logs(deployment)
        counted = [after - before for after, before in zip(_fleet_bytes(deployment, "0-mall"), counted_before)]
        run_log = deployment.run_log(run_id)  # while the SuperLink still serves it
    finally:
        deployment.close()

    assert "fedreid_round 1.0" in scraped and 'fedreid_round_sites{outcome="replied"} 2.0' in scraped
    assert 'fedreid_round_bytes{direction="up"}' in scraped and "fedreid_aggregation_seconds" in scraped
    rounds = _rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["train"]["failed"] == ["2-campus"] and set(rounds[1]["train"]["sites"]) == {"0-mall"}
    assert not rounds[1]["train"]["rejected"]  # failed, by name: not a site that refused the round
    assert rounds[1]["train"]["aggregated"]
    assert rounds[1]["seconds"] < 100  # answered for by the restarted worker, not after the round's timeout
    assert set(rounds[2]["train"]["sites"]) == set(sites)  # rejoined
    campus = deployment.log("client-2-campus.log")
    assert "exited with code -9; starting it again" in campus
    assert "answered for the task the previous site worker died in" in campus
    assert "restored this site's head and masks" in campus  # by the restarted box's worker
    assert campus.count("site worker ready") == 3 and ", 1 CPU threads," in campus
    mall = deployment.log("client-0-mall.log")  # one site worker served all four of its messages:
    assert mall.count("message handled") == 4 and mall.count("scanned and checked") == 1, mall  # one scan,
    assert mall.count("decoded") + mall.count("from the disk cache") == 3, mall  # each image set decoded once
    assert set(rounds[-1]["evaluate"]["sites"]) == set(sites)
    third = rounds[2]["train"]["bytes_per_site"]
    assert third["2-campus"]["sent"] > 3 * third["0-mall"]["sent"]  # the whole model, against a change
    assert rounds[1]["train"]["bytes_per_site"]["0-mall"]["received"] < 0.3 * rounds[0]["train"]["bytes_per_site"][
        "0-mall"]["sent"]  # the mall's upload: an 8-bit change, about a quarter of the whole model
    exchanges = [r["train"] for r in rounds] + [rounds[-1]["evaluate"]]
    reported = [sum(e["bytes_per_site"]["0-mall"][way] for e in exchanges) for way in ("sent", "received")]
    for kernel, ours in zip(counted, reported):  # down, then up, as the mall's SuperNode sees them
        assert ours <= kernel <= 1.02 * ours + 1_500_000, (counted, reported)
    assert clientapps == []  # no process per message, at any point of the run
    assert "fedreid run" in run_log.lower() or "round" in run_log.lower(), run_log[-2000:]  # a real log, read
    assert "did not answer: <class" not in run_log
    _check_hostile_runs(deployment, hostile, tmp_path, sites)
    _check_private_files(deployment, tmp_path / "site-state")


@pytest.mark.load  # 85-105 s: `make test-load`; make test keeps the resume logic in tests/test_resume_and_state.py
@pytest.mark.parametrize("before_first_checkpoint", [
    False, pytest.param(True, id="and-before-the-first-checkpoint")])
def test_a_superlink_killed_at_any_moment_resumes_with_every_round_exactly_once(
        tiny_sites: Path, tmp_path: Path, before_first_checkpoint: bool) -> None:
    """SIGKILL the SuperLink (its ServerApp dies with it) after round 2's metrics line, before its
    checkpoint: the resumed run drops that line, trains round 2 again and finishes, every round once.
    With ``before_first_checkpoint`` (one more resume, 30 s), it is first also killed while the
    sites train round 1, before any checkpoint. Both run in `make test-load`. (A SuperLink killed mid-round while
    the sites wait for their next message is `make test-compose`'s restart test; a run that died
    before its first checkpoint starting over, tests/test_resume_and_state.py; a resumed run naming
    the sites it waits for, tests/test_rounds.py.)"""
    sites = {name: path for name, path in _sites(tiny_sites).items() if name in ("0-mall", "1-station")}
    deployment = Deployment(tmp_path, sites)
    outputs, marker = tmp_path / "outputs", tmp_path / "paused"
    overrides = "federation.min_sites=2 federation.rounds=3 federation.round_timeout_s=240 federation.report_every_s=2"
    run_config = f'profile="test" output-dir="{outputs}" overrides="{overrides}"'
    pause = {"FEDREID_TEST_PAUSE": "recorded:2", "FEDREID_TEST_PAUSE_MARKER": str(marker)}

    def resume(env: dict[str, str] | None = None) -> int:
        deployment.start_server(env=env)
        deployment.wait_for_nodes(len(deployment.clients))
        logs.mark()
        return deployment.submit(run_config + ' resume="latest"')

    try:
        if before_first_checkpoint:
            deployment.start_all()
            logs = ClientLogs(deployment)
            runs = [deployment.submit(run_config)]
            _wait_for(lambda: "round 1] epoch" in logs.since_mark(), "training of round 1", deployment)
            deployment.kill_server()
            (folder,) = [p for p in outputs.iterdir() if p.is_dir()]
            assert not (folder / "global_model.pt").exists()
            runs.append(resume(pause))
        else:
            deployment.start_all(env=pause)
            logs = ClientLogs(deployment)
            runs = [deployment.submit(run_config)]
        _wait_for(marker.exists, "the pause after round 2's metrics line", deployment)
        deployment.kill_server()
        (folder,) = [p for p in outputs.iterdir() if p.is_dir()]
        assert [r["round"] for r in _rounds(folder)] == [1, 2]
        assert torch.load(folder / "global_model.pt", weights_only=True)["round"] == 1

        runs.append(resume())
        status = deployment.wait_finished(runs[-1], timeout=600)
        assert status == "finished:completed", _logs(deployment)
        assert all(deployment.status(run) != "finished:completed" for run in runs[:-1])
    finally:
        deployment.close()

    assert [p for p in outputs.iterdir() if p.is_dir()] == [folder]
    rounds = _rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(set(r["train"]["sites"]) == set(sites) and not r["train"]["failed"] for r in rounds)
    assert set(rounds[-1]["evaluate"]["sites"]) == set(sites)
    assert torch.load(folder / "global_model.pt", weights_only=True)["round"] == 3
    assert all("restored this site's head" in deployment.log(f"client-{site}.log") for site in sites)
