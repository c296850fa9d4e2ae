"""``AcquireTask`` waits for work (server/task_bell.py): Flower's real SuperNode app, served over HTTP and
asked by the site worker's own signed client, answers the moment a task is created, and empty after
its wait when none comes; the SuperLink's SQLite state rings the same bell."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import pytest

from clients.executor import RuntimeAddress
from server import task_bell
from tests.asgi_server import serving


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bell installed for one test; Flower's handler and both create_task methods restored after it."""
    import flwr.supercore.corestate.in_memory_corestate as in_memory
    import flwr.supercore.corestate.sql_corestate as sql
    import flwr.supercore.servicer.runtime.runtime_handlers as handlers

    monkeypatch.setattr(handlers, "acquire_task", handlers.acquire_task)
    monkeypatch.setattr(in_memory.InMemoryCoreState, "create_task", in_memory.InMemoryCoreState.create_task)
    monkeypatch.setattr(sql.SqlCoreState, "create_task", sql.SqlCoreState.create_task)
    task_bell.install()
    wrapped = (handlers.acquire_task, in_memory.InMemoryCoreState.create_task, sql.SqlCoreState.create_task)
    task_bell.install()  # twice: still one wrapper around each
    assert wrapped == (handlers.acquire_task, in_memory.InMemoryCoreState.create_task, sql.SqlCoreState.create_task)
    assert all(getattr(function, "fedreid_task_bell", False) for function in wrapped)


def _supernode(secret: bytes) -> tuple[Any, Any]:
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory

    factory = NodeStateFactory(ObjectStoreFactory())
    return create_app(state_factory=factory, superexec_auth_secret=secret), factory.state()


def _ask(address: RuntimeAddress, answers: list[tuple[float, Any]]) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = address.client()
    try:
        response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)]))
        answers.append((time.monotonic(), response))
    finally:
        client.close()


def test_a_task_created_while_the_worker_asks_is_handed_over_at_once(installed: None) -> None:
    from flwr.supercore.constant import TaskType

    secret = secrets.token_bytes(32)
    app, state = _supernode(secret)
    with serving(app) as url:
        address = RuntimeAddress(url.removeprefix("http://"), secret)
        answers: list[tuple[float, Any]] = []
        asking = threading.Thread(target=_ask, args=(address, answers))
        asked = time.monotonic()
        asking.start()
        time.sleep(0.4)  # the ask is being held at the SuperNode meanwhile
        assert asking.is_alive() and not answers
        created = time.monotonic()
        task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=7, fab_hash="f" * 64)
        asking.join(timeout=10)
    answered, response = answers[0]
    assert response.HasField("task") and response.task.task_id == task_id and response.token
    assert answered - created < 0.3, "the waiting ask was not woken by the new task"
    assert answered - asked < task_bell.WAIT_S + 0.3


def test_without_a_task_the_ask_is_answered_empty_after_its_wait(installed: None) -> None:
    secret = secrets.token_bytes(32)
    app, _ = _supernode(secret)
    with serving(app) as url:
        address = RuntimeAddress(url.removeprefix("http://"), secret)
        answers: list[tuple[float, Any]] = []
        asked = time.monotonic()
        _ask(address, answers)
    answered, response = answers[0]
    assert not response.HasField("task") and not response.token
    assert task_bell.WAIT_S - 0.05 <= answered - asked < task_bell.WAIT_S + 1.0


def test_the_link_states_sqlite_create_task_rings_the_bell(installed: None, tmp_path: Any) -> None:
    """The SuperLink's SuperExec waits on the same bell; its SQLite state rings it."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    state = LinkStateFactory(str(tmp_path / "link.db"), NoOpFederationManager(), ObjectStoreFactory()).state()
    assert isinstance(state, SqlCoreState)
    seen = task_bell.BELL.rung
    state.create_task(task_type=TaskType.SERVER_APP, run_id=1, fab_hash="f" * 64)
    assert task_bell.BELL.rung == seen + 1


def test_the_bell_wakes_a_waiter_only_for_a_ring_after_what_it_saw() -> None:
    bell = task_bell.TaskBell()
    seen = bell.rung
    started = time.monotonic()
    assert not bell.wait_past(seen, 0.2)  # nothing rang: the full wait
    assert time.monotonic() - started >= 0.19
    bell.ring()  # a ring between reading and waiting is not slept through
    assert bell.wait_past(seen, 5.0)


def test_the_flower_names_it_patches_exist_in_the_pinned_flower() -> None:
    from server.flower_cli import import_flower_names

    modules = import_flower_names(task_bell.FLOWER_TASK_BELL_API, "server/task_bell.py")
    for module_name, class_name in task_bell.STATE_CLASSES:
        assert callable(getattr(getattr(modules[module_name], class_name), "create_task"))
