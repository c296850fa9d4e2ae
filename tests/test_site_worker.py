"""The site worker: a real process on a real Unix socket, driven through the thin ClientApp.

The reply it gives is the one the ClientApp would compute itself; its second message reuses the
scan and the decoded images; a failing message is answered with the error and the worker serves
on; a killed worker is reported clearly and started again for the next message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import handle
from clients.handlers import LOCAL_STATE_KEY
from clients.site import SiteLocation, load_site
from clients.worker_link import LAUNCH_FILE, WORKER_KEY, WorkerFailed, WorkerUnavailable
from reid.config import SiteRunSpec
from reid.models import ModelSpec, build_model, shared_state
from reid.train import TrainConfig
from strategies.packing import is_packed, pack_record, unpack_record

REPO = Path(__file__).resolve().parent.parent
SPEC = SiteRunSpec(model=ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32),
                   train=TrainConfig(batch_size=16, num_workers=1), bn_stats="local")


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _content(server_round: int, packed: bool = True) -> RecordDict:
    torch.manual_seed(0)
    arrays = ArrayRecord(shared_state(build_model(SPEC.model), SPEC.bn_stats))
    config = ConfigRecord({**SPEC.to_flat(), "server-round": server_round, "run-tag": "worker-test"})
    return RecordDict({"arrays": pack_record(arrays) if packed else arrays, "config": config})


def _context(site: Path, state_dir: Path, socket: Path | None) -> Context:
    node_config = {"data-root": str(site), "dataset": "tiny-site", "state-dir": str(state_dir)}
    if socket is not None:
        node_config[WORKER_KEY] = str(socket)
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


class Worker:
    """``python -m clients.worker`` with its log in a file, as fedreid-client starts it."""

    def __init__(self, folder: Path) -> None:
        self.socket, self.log_file = folder / "worker.sock", folder / "worker.log"
        command = [sys.executable, "-m", "clients.worker", "--socket", str(self.socket),
                   "--parent-pid", str(os.getpid())]
        self.socket.with_name(LAUNCH_FILE).write_text(json.dumps({"command": command, "cwd": str(REPO)}))
        self.process = subprocess.Popen(command, cwd=REPO, stderr=open(self.log_file, "ab"))  # noqa: SIM115
        _wait_for(lambda: "site worker ready" in self.log(), "the worker to be ready")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def pids(self) -> list[int]:
        found = subprocess.run(["pgrep", "-f", f"clients.worker --socket {self.socket}"], capture_output=True,
                               text=True, check=False)
        return [int(p) for p in found.stdout.split()]

    def stop(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture()
def site_copy(tiny_site: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(tiny_site, site)
    return site


def test_the_worker_answers_as_the_clientapp_would_and_keeps_its_caches(site_copy: Path, tmp_path: Path) -> None:
    local_reply = handle("train", _content(1), _context(site_copy, tmp_path / "local-state", None))
    worker = Worker(tmp_path)
    try:
        context = _context(site_copy, tmp_path / "state", worker.socket)
        reply = handle("train", _content(1), context)
        assert is_packed(reply["arrays"])  # it answers in the form it was sent
        mine, theirs = unpack_record(reply["arrays"]), unpack_record(local_reply["arrays"])
        assert set(mine.keys()) == set(theirs.keys())
        for key in mine.keys():
            np.testing.assert_array_equal(mine[key].numpy(), theirs[key].numpy(), err_msg=key)
        assert LOCAL_STATE_KEY in context.state  # the worker's state update came back into the Context
        assert list((tmp_path / "state").glob("*.state"))  # and was saved on the site's disk

        handle("evaluate", _content(1), context)
        handle("train", _content(2), context)
        log = worker.log()
        assert log.count("scanned and checked") == 1, log  # the second and third message rescan nothing
        assert log.count("decoded") + log.count("from the disk cache") == 3, log  # train, query, gallery: once each
        assert log.count("message handled") == 3
    finally:
        worker.stop()


def test_a_failing_message_is_reported_and_the_worker_serves_on(site_copy: Path, tmp_path: Path) -> None:
    worker = Worker(tmp_path)
    try:
        context = _context(site_copy, tmp_path / "state", worker.socket)
        broken = _content(1)
        broken["config"]["model.backbone"] = "no-such-backbone"
        with pytest.raises(WorkerFailed, match="no-such-backbone"):
            handle("train", broken, context)
        assert not handle("evaluate", _content(1), context)["metrics"]["num-queries"] == 0
        assert worker.process.poll() is None
    finally:
        worker.stop()


def test_a_killed_worker_is_named_in_the_error_and_started_again(site_copy: Path, tmp_path: Path) -> None:
    worker = Worker(tmp_path)
    try:
        context = _context(site_copy, tmp_path / "state", worker.socket)
        handle("evaluate", _content(1), context)
        worker.process.kill()
        worker.process.wait(timeout=30)
        with pytest.raises(WorkerUnavailable, match="is not running.*restarted for the next message"):
            handle("evaluate", _content(1), context)
        _wait_for(lambda: len(worker.pids()) == 1 and worker.socket.exists(), "the restarted worker")
        assert handle("evaluate", _content(1), context)["metrics"]["num-queries"] > 0
    finally:
        worker.stop()


def test_a_changed_data_folder_is_scanned_again(site_copy: Path) -> None:
    location = SiteLocation("tiny-site", site_copy)
    first = load_site(location)
    assert load_site(location) is first  # unchanged: the scan is reused
    extra = next((site_copy / "train").glob("*.jpg"))
    shutil.copy(extra, extra.with_name("0999_c1s1_000001_00.jpg"))
    again = load_site(location)
    assert again is not first and len(again.train) == len(first.train) + 1
