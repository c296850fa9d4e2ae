"""Asks that wait for their answer (server/long_polls.py). ``AcquireTask``: Flower's real SuperNode app,
served over HTTP and asked by the site worker's own signed client, answers the moment a task is
created, and empty after its wait when none comes; the SuperLink's SQLite state rings the same bell.
``PullMessages``: Flower's real SuperLink handler returns a reply stored while it waits."""

from __future__ import annotations

import importlib
import secrets
import threading
import time
from typing import Any

import pytest

from clients.executor import RuntimeAddress
from server import long_polls
from tests.asgi_server import serving


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both waits installed for one test; Flower's handlers and the state methods restored after it."""
    import flwr.supercore.servicer.runtime.runtime_handlers as core
    import flwr.superlink.servicer.runtime.runtime_handlers as link

    patched = [(core, "acquire_task"), (link, "pull_messages")]
    for module_name, class_name in long_polls.TASK_CREATORS:
        patched.append((getattr(importlib.import_module(module_name), class_name), "create_task"))
    for module_name, class_name in long_polls.REPLY_STORERS:
        patched.append((getattr(importlib.import_module(module_name), class_name), "store_message_res"))
    for owner, name in patched:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    long_polls.install_task_wait()
    long_polls.install_reply_wait()
    wrapped = [getattr(owner, name) for owner, name in patched]
    long_polls.install_task_wait()  # twice: still one wrapper around each
    long_polls.install_reply_wait()
    assert wrapped == [getattr(owner, name) for owner, name in patched]
    assert all(getattr(function, "fedreid_long_poll", False) for function in wrapped)


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
    assert answered - asked < long_polls.WAIT_S + 0.3


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
    assert long_polls.WAIT_S - 0.05 <= answered - asked < long_polls.WAIT_S + 1.0


def test_the_link_states_sqlite_create_task_rings_the_bell(installed: None, tmp_path: Any) -> None:
    """The SuperLink's SuperExec waits on the same bell; its SQLite state rings it."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    state = LinkStateFactory(str(tmp_path / "link.db"), NoOpFederationManager(), ObjectStoreFactory()).state()
    assert isinstance(state, SqlCoreState)
    seen = long_polls.TASKS.rung
    state.create_task(task_type=TaskType.SERVER_APP, run_id=1, fab_hash="f" * 64)
    assert long_polls.TASKS.rung == seen + 1
    replies = long_polls.REPLIES.rung
    from flwr.app import Message, RecordDict

    assert state.store_message_res(Message(RecordDict(), dst_node_id=5, message_type="train")) is None  # refused
    assert long_polls.REPLIES.rung == replies  # nothing stored: nobody woken


def test_the_bell_wakes_a_waiter_only_for_a_ring_after_what_it_saw() -> None:
    bell = long_polls.Bell()
    seen = bell.rung
    started = time.monotonic()
    assert not bell.wait_past(seen, 0.2)  # nothing rang: the full wait
    assert time.monotonic() - started >= 0.19
    bell.ring()  # a ring between reading and waiting is not slept through
    assert bell.wait_past(seen, 5.0)


def test_the_flower_names_it_patches_exist_in_the_pinned_flower() -> None:
    from server.flower_cli import import_flower_names

    modules = import_flower_names(long_polls.FLOWER_LONG_POLL_API, "server/long_polls.py")
    for storers, method in ((long_polls.TASK_CREATORS, "create_task"), (long_polls.REPLY_STORERS, "store_message_res")):
        for module_name, class_name in storers:
            assert callable(getattr(getattr(modules[module_name], class_name), method))


class _LinkStateWithAReplyLater:
    """The part of a link state Flower's ``pull_messages`` handler reads; ``reply`` appears when stored."""

    def __init__(self, reply: Any) -> None:
        self.reply, self.stored = reply, False
        self.object_store = self
        self.deleted: list[set[str]] = []

    def get_message_res(self, message_ids: set[str], run_id: int) -> list[Any]:
        return [self.reply] if self.stored and self.reply.metadata.reply_to_message_id in message_ids else []

    def get_message_ins(self, node_id: int, limit: Any, run_id: int) -> list[Any]:
        return []

    def delete_messages(self, message_ins_ids: set[str]) -> None:
        self.deleted.append(message_ins_ids)

    def get_object_tree(self, object_id: str) -> Any:
        from flwr.proto.message_pb2 import ObjectTree

        return ObjectTree(object_id=object_id)

    def store(self) -> None:  # what the wrapped store_message_res does after storing: ring
        self.stored = True
        long_polls.REPLIES.ring()


def test_the_servers_pull_is_answered_the_moment_a_reply_is_stored(installed: None) -> None:
    import flwr.superlink.servicer.runtime.runtime_handlers as link
    from flwr.app import Message, RecordDict
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.proto.task_pb2 import Task

    sent = Message(RecordDict(), dst_node_id=5, message_type="train", group_id="1")
    sent.metadata.__dict__["_message_id"] = sent.object_id
    reply = Message(RecordDict(), reply_to=sent)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    reply.metadata.__dict__["_run_id"] = 3
    state = _LinkStateWithAReplyLater(reply)
    request = PullAppMessagesRequest(message_ids=[sent.metadata.message_id])
    answers: list[tuple[float, Any]] = []
    pulling = threading.Thread(target=lambda: answers.append(
        (time.monotonic(), link.pull_messages(request, state, Task(run_id=3)))))
    asked = time.monotonic()
    pulling.start()
    time.sleep(0.3)
    assert pulling.is_alive() and not answers  # held while no reply is there
    stored = time.monotonic()
    state.store()
    pulling.join(timeout=10)
    answered, response = answers[0]
    assert [m.metadata.message_id for m in response.messages_list] == [reply.metadata.message_id]
    assert answered - stored < 0.2 and answered - asked < long_polls.WAIT_S
    started = time.monotonic()
    empty = link.pull_messages(PullAppMessagesRequest(message_ids=[]), state, Task(run_id=3))
    assert not empty.messages_list and time.monotonic() - started < 0.2  # an ask for nothing is not held
