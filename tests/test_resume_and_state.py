"""Nothing lost on failure: resume points, site state on disk, and the Prometheus gauges."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from clients.kept import persist_site_state, restore_site_state, state_file
from server.flower_cli import free_port
from server.outputs import RunFolderBusy, RunOutputs, hold_run_folder
from server.resume import ResumeError, find_run_folder, load_resume_point
from server.telemetry import FederationGauges


def _run_folder(root: Path, name: str, checkpoint_round: int, metric_rounds: list[int]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    outputs = RunOutputs(folder)
    for r in metric_rounds:
        outputs.append_round({"round": r, "train": None, "evaluate": None})
    torch.save({"state_dict": {"w": torch.full((2, 2), float(checkpoint_round))}, "round": checkpoint_round},
               folder / "global_model.pt")
    return folder


def test_resume_drops_the_line_of_a_round_whose_checkpoint_was_not_written(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path, "a", checkpoint_round=2, metric_rounds=[0, 1, 2, 3])
    point = load_resume_point(folder)
    assert point.next_round == 3
    assert [r["round"] for r in point.rounds] == [0, 1, 2]
    assert [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert np.array_equal(point.arrays["w"].numpy(), np.full((2, 2), 2.0, dtype=np.float32))


def test_resume_latest_takes_the_newest_run_folder_and_names_what_is_missing(tmp_path: Path) -> None:
    old = _run_folder(tmp_path, "20261122-010000-fedpav-run1", 1, [0, 1])
    new = _run_folder(tmp_path, "20261122-020000-fedpav-run2", 1, [0, 1])
    os.utime(new / "global_model.pt", (time.time() - 100, time.time() - 100))  # start time decides, not mtime
    assert find_run_folder(tmp_path, "latest") == new.resolve()
    assert find_run_folder(tmp_path, old.name) == old.resolve()
    with pytest.raises(ResumeError, match="no run folder"):
        find_run_folder(tmp_path / "empty", "latest")
    with pytest.raises(ResumeError, match="nothing: it holds no config.yaml"):
        find_run_folder(tmp_path, str(tmp_path / "nothing"))


def test_a_run_that_died_before_its_first_checkpoint_starts_over_keeping_round_0(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path, "a", checkpoint_round=1, metric_rounds=[0, 1])
    (folder / "global_model.pt").unlink()  # killed between the round-1 line and its checkpoint
    point = load_resume_point(folder)
    assert point.next_round == 1 and point.arrays is None
    assert [r["round"] for r in point.rounds] == [0]


def test_site_state_survives_a_new_supernode_process(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = RecordDict()
    head = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    first["local-state"] = ArrayRecord({"classifier.weight": Array(head)})
    first["pruning-state"] = ConfigRecord({"ratio": 0.25, "pending": True})
    path = state_file(state_dir, "20261122-fedklpr-run3")
    persist_site_state(first, path)
    assert path.is_file() and not path.with_suffix(".tmp").exists()

    restarted = RecordDict()
    assert restore_site_state(restarted, path)
    assert np.array_equal(restarted["local-state"]["classifier.weight"].numpy(), head)
    assert restarted["pruning-state"]["ratio"] == 0.25
    # a SuperNode that already holds state keeps it; another run tag starts fresh; no state-dir = nothing
    assert not restore_site_state(restarted, path)
    assert not state_file(state_dir, "other-run").exists()
    assert state_file(None, "x") is None
    assert state_file(state_dir, "../../evil").parent == state_dir  # a run tag cannot name another folder
    path.write_bytes(b"\x00garbage")
    assert not restore_site_state(RecordDict(), path)


def test_prometheus_endpoint_serves_the_round_gauges(tmp_path: Path) -> None:
    gauges = FederationGauges(tmp_path, "fedpav")
    port = free_port()
    gauges.serve(port, "127.0.0.1")
    gauges.record_round({
        "round": 3, "seconds": 12.5,
        "train": {"sites": {"mall": {}, "station": {}}, "rejected": {"campus": "bad shape"}, "failed": ["lab"],
                  "bytes": {"sent": 300, "received": 200}, "aggregation_seconds": 0.25},
        "evaluate": {"sites": {"mall": {"rank1": 0.5, "mAP": 0.4}}, "bytes": {"sent": 30, "received": 2}},
    })
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "fedreid_round 3.0" in text
    assert 'fedreid_round_sites{outcome="replied"} 2.0' in text
    assert 'fedreid_round_sites{outcome="rejected"} 1.0' in text
    assert 'fedreid_round_sites{outcome="failed"} 1.0' in text
    assert 'fedreid_round_bytes{direction="up"} 200.0' in text
    assert 'fedreid_bytes{direction="down"} 330.0' in text
    assert "fedreid_aggregation_seconds 0.25" in text and "fedreid_round_seconds 12.5" in text
    assert 'fedreid_site_rank1{site="mall"} 0.5' in text and 'fedreid_site_map{site="mall"} 0.4' in text
    assert "fedreid_round 3.0" in (tmp_path / "metrics.prom").read_text()


def test_one_serverapp_at_a_time_holds_a_run_folder(tmp_path: Path) -> None:
    first = hold_run_folder(tmp_path)
    waited: list[str] = []
    with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
        hold_run_folder(tmp_path, wait_s=1.0, on_wait=waited.append, report_every_s=0.3)
    assert waited and waited[0] == f"pid {os.getpid()}"  # told whom it waits for, more than once a run
    first.close()  # the holder ends: the folder is free at once
    second = hold_run_folder(tmp_path, wait_s=1.0)
    second.close()


def test_the_superlink_state_waits_for_a_locked_database_as_long_as_configured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedreid-server's entry point raises Flower's 5-s SQLite busy timeout; check it on a connection
    of Flower's own SQL object store, as the SuperLink opens them."""
    from flwr.supercore import sql_mixin
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from sqlalchemy import text

    from server.superlink_main import set_sqlite_busy_timeout

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after the test
    assert ("busy_timeout", "5000") in sql_mixin.SQLITE_PRAGMAS  # Flower's own, which dropped replies
    set_sqlite_busy_timeout(120_000)
    store = SqlObjectStore(str(tmp_path / "state.db"))
    store.initialize()
    with store.session() as session:
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 120_000
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"  # the rest as Flower sets it


def test_the_superlink_keeps_payloads_in_memory_and_runs_and_keys_in_its_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fedreid-server's default: Flower's ObjectStore in memory, its LinkState in the SQLite file, as
    the SuperLink builds them; every Flower name the entry point touches exists under the pin."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink import main as flower_main
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.superlink.federation import NoOpFederationManager

    from server import superlink_main

    superlink_main.check_flower_api()
    monkeypatch.setattr(flower_main, "get_objectstore_linkstate_factories",
                        flower_main.get_objectstore_linkstate_factories)  # Flower's own back after the test
    superlink_main.keep_payloads_in_memory()
    objects, links = flower_main.get_objectstore_linkstate_factories(str(tmp_path / "superlink.db"),
                                                                     NoOpFederationManager())
    state = links.state()
    assert isinstance(objects.store(), InMemoryObjectStore) and isinstance(state, SqlLinkState)
    assert state.object_store is objects.store()
    assert (tmp_path / "superlink.db").is_file()


def test_push_sessions_live_in_memory_beside_the_payloads_and_an_expired_one_drops_its_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With payloads in memory, a model's upload is tracked without a SQLite row (server/push_sessions.py)
    and still behaves as Flower's: only announced objects are taken, each once, with its hash checked;
    a session that has expired gives up its objects."""
    from datetime import timedelta

    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.superlink import main as flower_main
    from flwr.superlink.federation import NoOpFederationManager
    from sqlalchemy import text

    from server import push_sessions, superlink_main

    monkeypatch.setattr(SqlCoreState, "fedreid_sessions_in_memory", False, raising=False)
    for name in (*push_sessions.SESSION_METHODS, "__init__"):  # Flower's own back after the test
        monkeypatch.setattr(SqlCoreState, name, getattr(SqlCoreState, name))
    monkeypatch.setattr(flower_main, "get_objectstore_linkstate_factories",
                        flower_main.get_objectstore_linkstate_factories)
    superlink_main.keep_payloads_in_memory()
    push_sessions.install()
    _, links = flower_main.get_objectstore_linkstate_factories(str(tmp_path / "superlink.db"), NoOpFederationManager())
    state = links.state()

    def announced(values: int) -> tuple[Message, dict[str, bytes], str]:
        arrays = ArrayRecord({"w": Array(np.arange(values, dtype=np.float32))})
        message = Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type="train")
        session = state.start_session(7)
        pending = state.preregister_object_tree(get_object_tree(message), session)
        contents = {key: obj.deflate() for key, obj in get_all_nested_objects(message).items()}
        assert set(pending) == set(contents)  # a 6 MB array: two chunks, the array, records, the message
        return message, contents, session

    message, contents, session = announced(1_500_000)
    assert not state.store_object(7, session, "f" * 64, b"not announced")
    assert not state.store_object(8, session, next(iter(contents)), contents[next(iter(contents))])  # other run
    for key, content in contents.items():
        assert state.store_object(7, session, key, content)
        assert not state.store_object(7, session, key, content)  # each object once
    assert all(state.get_object(7, key) == content for key, content in contents.items())
    assert state._object_push_sessions == {}  # noqa: SLF001 - done: its bookkeeping is gone
    with state.session() as sql:
        for table in ("object_push_sessions", "object_push_session_pending"):
            assert sql.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar() == 0

    message, contents, session = announced(1_400_000)
    first = next(iter(contents))
    with pytest.raises(ValueError):  # a content that does not hash to its id is refused (Flower's check)
        state.object_store.put(first, contents[first][:-1] + b"x")
    state._object_push_sessions[session].expires_at = now() - timedelta(seconds=1)  # noqa: SLF001
    assert state.get_object(7, first) is None  # expired while waiting: the message's objects are dropped
    assert session not in state._object_push_sessions  # noqa: SLF001


def test_model_files_are_written_in_order_beside_the_loop_and_a_failed_write_is_raised_at_the_wait() -> None:
    import threading
    import time

    from server.background import BackgroundWrites

    writes, done, loop = BackgroundWrites(), [], threading.get_ident()
    writes.submit(lambda: (time.sleep(0.2), done.append(("checkpoint 1", threading.get_ident() != loop))))
    writes.submit(lambda: done.append(("checkpoint 2", threading.get_ident() != loop)))
    assert done == []  # submitting does not wait for the 0.2-s write
    writes.wait()
    assert done == [("checkpoint 1", True), ("checkpoint 2", True)]

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    writes.submit(full_disk)
    with pytest.raises(OSError, match="No space left"):
        writes.wait()
    writes.wait()  # raised once
