"""Asks that wait for their answer (server/long_polls.py). ``AcquireTask``: Flower's real SuperNode app,
served over HTTP and asked by the site worker's own signed client, answers the moment a task is
created, and empty after its wait when none comes; the SuperLink's SQLite state rings the same bell.
``PullMessages``: Flower's real SuperLink handler returns a reply stored while it waits."""

from __future__ import annotations

import contextlib
import importlib
import secrets
import threading
import time
from typing import Any, Callable, Iterator

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


@contextlib.contextmanager
def _served_supernode() -> Iterator[tuple[RuntimeAddress, Any]]:
    """Flower's real SuperNode app (its own state, a fresh SuperExec secret) served over HTTP: the
    address a site worker would be given, and the app's state."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory

    secret = secrets.token_bytes(32)
    factory = NodeStateFactory(ObjectStoreFactory())
    with serving(create_app(state_factory=factory, superexec_auth_secret=secret)) as url:
        yield RuntimeAddress(url.removeprefix("http://"), secret), factory.state()


def _timed(answers: list[tuple[float, Any]], ask: Callable[[], Any]) -> None:
    """Append ``ask()``'s answer with the moment it came."""
    response = ask()
    answers.append((time.monotonic(), response))


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

    with _served_supernode() as (address, state):
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
    with _served_supernode() as (address, _):
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
    from server.flower_names import import_flower_names

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
    pulling = threading.Thread(target=_timed, args=(answers, lambda: link.pull_messages(request, state, Task(run_id=3))))
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


def test_the_workers_pull_of_an_object_on_its_way_is_answered_the_moment_it_is_stored(installed: None) -> None:
    """Flower's real SuperNode app over HTTP, the worker's own task-bound client: an object the
    SuperNode announced but has not stored yet is handed over when ``put`` stores it, not after a retry."""
    from flwr.app import ConfigRecord
    from flwr.proto.message_pb2 import PullObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_object import get_object_tree

    long_polls.install_object_wait()
    record = ConfigRecord({"server-round": 4})
    with _served_supernode() as (address, state):
        state.object_store.preregister(9, get_object_tree(record))
        token = state.claim_task(state.create_task(task_type=TaskType.CLIENT_APP, run_id=9, fab_hash="f" * 64))
        client = address.client(token)
        answers: list[tuple[float, Any]] = []
        request = PullObjectRequest(node=Node(node_id=0), run_id=9, object_id=record.object_id)
        pulling = threading.Thread(target=_timed, args=(answers, lambda: client.PullObject(request)))
        asked = time.monotonic()
        pulling.start()
        time.sleep(0.3)
        assert pulling.is_alive() and not answers  # held: announced, not stored
        stored = time.monotonic()
        state.object_store.put(record.object_id, record.deflate())
        pulling.join(timeout=10)
        unknown = client.PullObject(PullObjectRequest(node=Node(node_id=0), run_id=9, object_id="0" * 64))
        client.close()
    answered, response = answers[0]
    assert response.object_available and response.object_content == record.deflate()
    assert answered - stored < 0.3 and answered - asked < long_polls.WAIT_S
    assert not unknown.object_found  # an object nobody announced is not waited for


def test_a_supernodes_pull_is_held_until_a_message_is_stored_also_when_flower_names_the_arguments(
        installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet servicer calls ``pull_messages(request=..., state=..., store=...)`` by name."""
    monkeypatch.setattr(long_polls, "MESSAGE_WAIT_S", 0.8)  # read at every ask: 3 s in service
    import flwr.server.superlink.fleet.message_handler.message_handler as fleet
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    long_polls.install_message_wait()

    class Link:
        def get_message_ins(self, node_id: int, limit: int) -> list[Any]:
            return []  # nothing for node 5, however often it rings

    state = Link()
    answers: list[tuple[float, Any]] = []
    pulling = threading.Thread(target=_timed, args=(answers, lambda: fleet.pull_messages(
        request=PullMessagesRequest(node=Node(node_id=5)), state=state, store=None)))
    asked = time.monotonic()
    pulling.start()
    time.sleep(0.3)
    assert pulling.is_alive() and not answers
    long_polls.INSTRUCTIONS.ring()  # something stored, not for this node: asked again, still held
    time.sleep(0.1)
    assert pulling.is_alive()
    pulling.join(timeout=10)
    answered, response = answers[0]
    assert not response.messages_list and answered - asked >= long_polls.MESSAGE_WAIT_S - 0.05  # the full wait


def test_the_supernode_stores_each_object_the_moment_it_arrives() -> None:
    """clients/supernode.py's store_as_pulled, around Flower's real pull_objects and object store:
    when an object is pulled, every object pulled before it is already in the store, and the loop's
    own store step is left nothing to do."""
    import types

    from flwr.app import Array, ArrayRecord, RecordDict
    import numpy as np
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supercore.object_store import ObjectStoreFactory

    from clients import supernode

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(6 * 2**20 // 4, dtype=np.float32))})})
    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(content).items()}
    store = ObjectStoreFactory().store()
    store.preregister(2, get_object_tree(content))
    seen_stored: list[int] = []

    def pull_object(object_id: str) -> bytes:
        seen_stored.append(sum(store.get(other) not in (None, b"") for other in objects))
        return objects[object_id]

    def flowers_receive(**kwargs: Any) -> dict[str, bytes]:  # Flower's order: pull all, then put what came
        contents = loop.pull_objects(list(objects), pull_object_fn=pull_object, max_concurrent_pulls=1)
        for object_id in list(contents):
            kwargs["object_store"].put(object_id, contents.pop(object_id))
        return contents

    loop = types.SimpleNamespace(_pull_and_store_message=flowers_receive, pull_objects=pull_objects)
    supernode.store_as_pulled(loop)
    supernode.store_as_pulled(loop)  # twice: still one wrapper
    left_for_the_loop = loop._pull_and_store_message(object_store=store)
    assert left_for_the_loop == {}
    assert seen_stored == list(range(len(objects)))  # each earlier object was stored before the next pull
    assert all(store.get(object_id) == blob for object_id, blob in objects.items())
    assert loop.pull_objects(["x"], pull_object_fn=lambda _id: b"raw") == {"x": b"raw"}  # outside a receipt: Flower's


def test_beyond_its_holds_an_ask_is_answered_at_once_as_by_flower() -> None:
    """A held ask keeps a server thread: only as many as the semaphore allows wait; the rest get
    Flower's immediate answer."""
    holds = threading.BoundedSemaphore(1)
    bell = long_polls.Bell()
    calls: list[float] = []

    def empty_handler(request: Any, state: Any) -> str:
        calls.append(time.monotonic())
        return "empty"

    ask = long_polls.held(empty_handler, bell, lambda _request, response: response != "empty", holds,
                          wait_s=lambda: 0.5)
    assert holds.acquire(blocking=False)  # another ask holds the only place
    started = time.monotonic()
    assert ask("request", None) == "empty" and time.monotonic() - started < 0.2 and len(calls) == 1
    holds.release()
    started = time.monotonic()
    assert ask("request", None) == "empty"  # now it waits the full 0.5 s, asking Flower once: nothing rang
    assert 0.45 <= time.monotonic() - started < 2.0 and len(calls) == 2
    assert holds.acquire(blocking=False)  # and gave its place back
