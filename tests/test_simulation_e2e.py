"""End to end: ``fedreid-sim`` runs `flwr run` on the Ray engine with real processes and files."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.models import ModelSpec, build_model, shared_state

pytestmark = pytest.mark.ray  # Ray's simulation engine: left out by `make gpu-check`
SIM = [sys.executable, "-m", "server.simulate"]
REPO = Path(__file__).resolve().parent.parent


def _simulation_command(sites_root: Path, tmp: Path, *extra: str, own_home: bool = True) -> list[str]:
    """fedreid-sim on the test profile; without ``own_home``, with the Flower home it makes per run."""
    home = ["--flwr-home", str(tmp / "flwr-home")] if own_home else []
    return [*SIM, "--profile", "test", "--sites", "3", "--sites-root", str(sites_root), "--no-generate",
            "--output-dir", str(tmp / "outputs"), *home, *extra]


def _simulate(sites_root: Path, tmp: Path, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_simulation_command(sites_root, tmp, *extra), cwd=REPO, text=True, capture_output=True,
                          timeout=600, env={**os.environ, **(env or {})})


def _port_is_closed(flwr_home: Path) -> bool:
    address = next(line for line in (flwr_home / "config.toml").read_text().splitlines() if "address" in line)
    port = int(address.split(":")[-1].strip('"'))
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _run_folder(tmp: Path) -> Path:
    folders = list((tmp / "outputs").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def test_three_sites_write_every_output(tiny_sites: Path, tmp_path: Path) -> None:
    """FedPav with RAF (every other end-to-end test runs plain FedPav), one round evaluated before and
    after, also with the queries at ½ and ¼ resolution; TensorBoard scalars on; run from a shell whose
    colour settings are forced (as Jupyter kernels and many CI systems set them)."""
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    (sites / "2-campus" / "train" / "0003_c1s1_999999_01.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    result = _simulate(sites, tmp_path, "--algorithm", "fedpav_raf", "--overrides",
                       "federation.rounds=1 federation.eval_at_start=true federation.eval_every=1 "
                       "data.eval_query_scales=[0.5,0.25] telemetry.tensorboard=true",
                       env={"FORCE_COLOR": "1", "CLICOLOR_FORCE": "1", "TERM": "xterm-color"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    folder = _run_folder(tmp_path)
    assert f"outputs: {folder}" in result.stdout
    assert "hands each message to the sites as it is stored" in result.stdout  # our flwr-simulation (simulation_engine)

    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1]
    names = {"0-mall", "1-station", "2-campus"}
    for line in lines[1:]:
        assert set(line["train"]["sites"]) == names and not line["train"]["rejected"]
        assert set(line["evaluate"]["sites"]) == names
        assert set(line["train"]["bytes_per_site"]) == names
        assert line["train"]["bytes"]["received"] > 3 * 4 * 4_000_000  # three resnet10 backbones, fp32
        assert line["train"]["seconds"] > 0 and line["seconds"] > 0
        weights = [s["weight"] for s in line["train"]["sites"].values()]
        assert sum(weights) == pytest.approx(1.0)
        for metrics in line["train"]["sites"].values():  # full resolution plus the two RAF students
            assert metrics["image-passes"] == 3 * (metrics["num-examples"] // 32) * 32
    for line in lines:  # each site's drift gap, and the means the server keeps
        for metrics in line["evaluate"]["sites"].values():
            assert metrics["drift-gap"] == pytest.approx(metrics["mAP"] - metrics["mAP@0.25"])
            assert 0 <= metrics["mAP@0.5"] <= 1 and 0 <= metrics["rank1@0.25"] <= 1
        mean = line["evaluate"]["mean"]
        assert mean["mAP@0.25"] == pytest.approx(np.mean([m["mAP@0.25"] for m in line["evaluate"]["sites"].values()]))
    for line in lines:  # where each round's time went, from the sites' own timings
        split = line["time_split"]
        parts = split["training_s"] + split["evaluation_s"] + split["aggregation_s"] + split["framework_s"]
        assert parts == pytest.approx(split["round_s"])
    # round 0's evaluation rides on round 1's training messages: both evaluations count in round 1
    assert lines[1]["time_split"]["training_s"] > 0 and lines[1]["time_split"]["evaluation_s"] > 0
    assert lines[0]["time_split"]["round_s"] < 1.0
    assert sum(line["time_split"]["round_s"] for line in lines) <= lines[-1]["elapsed_s"]
    assert lines[1]["train"]["sites"]["2-campus"]["corrupt-images"] == 1
    assert lines[1]["train"]["sites"]["0-mall"]["corrupt-images"] == 0
    for metrics in lines[1]["evaluate"]["sites"].values():
        assert 0 <= metrics["rank1"] <= 1 and 0 < metrics["mAP"] <= 1

    table = (folder / "results.md").read_text()
    assert "after round 1" in table and all(f"| {name} |" in table for name in names) and "**mean**" in table
    assert table in result.stdout

    checkpoint = torch.load(folder / "global_model.pt", weights_only=True)
    assert checkpoint["round"] == 1 and checkpoint["bn_stats"] == "local"
    spec = ModelSpec(**checkpoint["model"])
    expected = shared_state(build_model(spec), "local")
    assert checkpoint["state_dict"].keys() == expected.keys()
    assert not torch.equal(checkpoint["state_dict"]["bottleneck.0.weight"], expected["bottleneck.0.weight"])

    assert (folder / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model:" in (folder / "config.yaml").read_text()
    report = (folder / "report.html").read_text()  # one page, the figure inside it, no script
    assert base64.b64encode((folder / "metrics.png").read_bytes()).decode() in report and "<script" not in report
    assert all(f"<td>{name}</td>" in report for name in names) and "fedpav_raf, resnet10 at 64x32" in report
    mb_up = f"{lines[1]['train']['bytes']['received'] / 1e6:.2f}"
    assert f"<tr><td>1</td><td>3</td>" in report and f"<td>{mb_up}</td>" in report
    assert "None: every site that was asked answered" in report
    assert _port_is_closed(tmp_path / "flwr-home")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for site in names:
        assert scalars[f"eval/{site}/mAP"] == [(r, pytest.approx(100 * lines[r]["evaluate"]["sites"][site]["mAP"]))
                                              for r in (0, 1)]
        assert scalars[f"train/{site}/loss"] == [(1, pytest.approx(lines[1]["train"]["sites"][site]["train-loss"]))]
    assert scalars["eval/mean/rank1"][-1] == (1, pytest.approx(100 * lines[1]["evaluate"]["mean"]["rank1"]))
    assert scalars["bytes/up"] == [(1, pytest.approx(lines[1]["train"]["bytes"]["received"], rel=1e-6))]  # float32


def test_questions_to_the_superlink_start_no_process_and_an_unreachable_one_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run status, online sites and run logs are asked from this process over the Control API, not
    by a `flwr` process each (about two CPU-seconds of imports per question on this box)."""
    from server.control_api import ControlApi, ControlApiError
    from server.flower_cli import free_port
    from server.simulate import PrivateSuperLink

    with PrivateSuperLink(tmp_path / "flwr-home") as superlink:
        def no_process(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("a question started a process")

        monkeypatch.setattr(subprocess, "Popen", no_process)
        for _ in range(20):
            assert superlink.connection.runs() == [] and superlink.connection.online_nodes() == 0
        assert superlink.connection.status(123).startswith("unknown")
        monkeypatch.undo()
    absent = ControlApi(f"127.0.0.1:{free_port()}", None, attempts=2)
    with pytest.raises(ControlApiError, match="unavailable") as refused:
        absent.runs()
    assert refused.value.unreachable


def test_a_simulation_whose_superlink_is_stopped_from_outside_says_so(tmp_path: Path) -> None:
    """Someone else stops the run's SuperLink (`kill` from another process): the run's report names
    its own SuperLink and says it was stopped from outside, instead of reading another SuperLink."""
    from server.simulate import PrivateSuperLink

    with PrivateSuperLink(tmp_path / "flwr-home") as superlink:
        assert superlink.stopped_from_outside() is None
        subprocess.run(["kill", "-TERM", str(superlink.process.pid)], check=True)  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while superlink.stopped_from_outside() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        said = superlink.stopped_from_outside()
    assert said is not None and f"port {superlink.port}) was stopped from outside" in said, said
    assert str(tmp_path / "flwr-home" / "superlink.log") in said


def test_the_staged_app_packs_into_exactly_the_fab_flower_builds_from_the_folder(tmp_path: Path) -> None:
    """server/app_source.py leaves out only folders Flower's own rules exclude whole: same FAB bytes. On a
    copy of this project's pyproject.toml, .gitignore and site code, with a file the include rules would take
    planted in every folder its .gitignore and Flower exclude (a venv of ~100,000 files made the walk slow)."""
    from flwr.cli.build import build_fab_from_disk

    from server.app_source import staged_app

    app = tmp_path / "app"
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, app / name)
    shutil.copytree(REPO / "clients", app / "clients", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in (".venv/lib", "data/synthetic", "outputs/run", ".flwr/apps", "bench/results/runs", "x.egg-info",
                   "clients/__pycache__", ".git"):
        (app / folder).mkdir(parents=True, exist_ok=True)
        (app / folder / "planted.py").write_text("x = 1\n")
    with staged_app(app) as lean:
        assert not (lean / ".venv").exists() and not (lean / "outputs").exists() and not (lean / "data").exists()
        assert (lean / "clients" / "site.py").read_bytes() == (REPO / "clients" / "site.py").read_bytes()
        staged = build_fab_from_disk(lean)
    assert not lean.exists()  # removed afterwards
    assert staged == build_fab_from_disk(app)


def test_the_simulation_engine_hands_a_stored_message_over_at_once_and_keeps_flowers_loop(tmp_path: Path) -> None:
    """The pinned Flower still launches ``flwr-simulation`` by name and waits 0.1 s between looks;
    ours looks as soon as a message is stored (a second message for the same node right after the
    first), idles at Flower's pace, stops when Flower's event is set; the launcher runs our entry point."""
    import queue
    import threading

    from server import simulation_engine

    engine = simulation_engine.check_flower_api()

    class State:  # Flower's in-memory LinkState, reduced to what the loop uses
        def __init__(self) -> None:
            self.stored: list[tuple[int, str]] = []
            self.looks = 0

        def store_message_ins(self, node: int, text: str) -> None:
            self.stored.append((node, text))

        def get_message_ins(self, node_id: int, limit: int) -> list[str]:
            self.looks += 1
            mine = [m for m in self.stored if m[0] == node_id][:limit]
            for message in mine:
                self.stored.remove(message)
            return [text for _, text in mine]

    flower_pickup = engine.add_messages_to_queue
    state, stop, handed = State(), threading.Event(), queue.Queue()
    try:
        simulation_engine.pick_up_promptly(engine)
        thread = threading.Thread(target=engine.add_messages_to_queue, args=(state, handed, {7: 0, 8: 1}, stop))
        thread.start()
        time.sleep(0.35)
        idle_looks = state.looks
        waits = []
        for text in ("first", "second"):
            start = time.monotonic()
            state.store_message_ins(7, f"{text} for 7")
            state.store_message_ins(7, f"{text} again for 7")
            assert handed.get(timeout=2) == f"{text} for 7" and handed.get(timeout=2) == f"{text} again for 7"
            waits.append(time.monotonic() - start)
            time.sleep(0.25)
        stop.set()
        thread.join(timeout=2)
    finally:
        engine.add_messages_to_queue = flower_pickup
    assert not thread.is_alive()
    assert 2 * 2 <= idle_looks <= 2 * 5  # two nodes looked at every 0.1 s while nothing was stored
    assert max(waits) < 0.09, waits  # Flower's own: 0.1-0.2 s for the two messages of one node

    launcher = simulation_engine.write_launcher(tmp_path / "bin") / "flwr-simulation"
    shown = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--runtime-api-address" in shown.stdout
    assert shutil.which("flwr-simulation", path=str(tmp_path / "bin")) == str(launcher)
