"""Runtime and Fleet API asks that wait for their answer instead of being answered empty at once.

Flower 1.39 answers every ask at once, empty when there is nothing yet, and its callers ask in loops:
each site worker asks its SuperNode for a task (every 0.05 s while a run is going) and for the
objects of its input (backing off 0.05-0.1 s), the SuperLink's SuperExec asks for a run to start
(every 0.1 s), the ServerApp asks for the sites' replies (every ``federation.poll_interval_s``)
and for their objects, and each SuperNode asks its SuperLink for a message (every
``--poll-interval``) and for the objects of one still arriving. Every empty answer is a request on
both sides, and what arrives meanwhile waits for the next ask. Traced on this 2-core box
(bench/round_trace.py, 3 TLS sites): about 150 task asks and 30 reply asks a round, in the
processes that carry the model at the same time.

Here an ask that would be answered empty is held until something it could return appears, or
``WAIT_S`` (1 s; a SuperNode's ask for a message: ``MESSAGE_WAIT_S``, 3 s) passed: Flower's own handler is asked again whenever a bell rings, and its answer is
returned unchanged. The bells: ``create_task`` (both state implementations) for ``AcquireTask``;
``store_message_res`` (both link states) for the ServerApp's ``PullMessages``; ``store_message_ins``
for a SuperNode's ``PullMessages``; an object store's ``put`` for every ``PullObject`` of an object
that was announced but is not stored yet. At most 16 HTTP asks and 256 gRPC asks are held at once
in a process (``RUNTIME_HOLDS``, ``FLEET_HOLDS``); beyond that an ask is answered at once, as by
Flower, and its caller polls as before. A caller that does not expect the wait still works.

The SuperLink installs all four (server/superlink_main.py), each SuperNode the task and object
waits (clients/supernode.py), before Flower builds its app. Every Flower name touched is listed in
``FLOWER_LONG_POLL_API`` and checked at install.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from server.flower_names import import_flower_names

CORE_HANDLERS = "flwr.supercore.servicer.runtime.runtime_handlers"  # both Runtime APIs call its acquire_task
LINK_HANDLERS = "flwr.superlink.servicer.runtime.runtime_handlers"  # the ServerApp's asks of the SuperLink
NODE_HANDLERS = "flwr.supernode.servicer.runtime.runtime_handlers"  # the site worker's asks of its SuperNode
FLEET_HANDLERS = "flwr.server.superlink.fleet.message_handler.message_handler"  # the SuperNodes' asks (gRPC)
IN_MEMORY_CORE = ("flwr.supercore.corestate.in_memory_corestate", "InMemoryCoreState")
SQL_CORE = ("flwr.supercore.corestate.sql_corestate", "SqlCoreState")
IN_MEMORY_LINK = ("flwr.server.superlink.linkstate.in_memory_linkstate", "InMemoryLinkState")
SQL_LINK = ("flwr.server.superlink.linkstate.sql_linkstate", "SqlLinkState")
IN_MEMORY_OBJECTS = ("flwr.supercore.object_store.in_memory_object_store", "InMemoryObjectStore")
SQL_OBJECTS = ("flwr.supercore.object_store.sql_object_store", "SqlObjectStore")
TASK_CREATORS = (IN_MEMORY_CORE, SQL_CORE)  # create_task: the SuperNode's state and the SuperLink's
REPLY_STORERS = (IN_MEMORY_LINK, SQL_LINK)  # store_message_res
INSTRUCTION_STORERS = (IN_MEMORY_LINK, SQL_LINK)  # store_message_ins
OBJECT_STORERS = (IN_MEMORY_OBJECTS, SQL_OBJECTS)  # put
OBJECT_PULLS = ((NODE_HANDLERS, "pull_object"), (LINK_HANDLERS, "pull_object"), (FLEET_HANDLERS, "pull_object"))
FLOWER_LONG_POLL_API = {
    CORE_HANDLERS: ["acquire_task"],
    LINK_HANDLERS: ["pull_messages", "pull_object"],
    NODE_HANDLERS: ["pull_object"],
    FLEET_HANDLERS: ["pull_messages", "pull_object"],
    **{module: [name] for module, name in (IN_MEMORY_CORE, SQL_CORE, IN_MEMORY_LINK, SQL_LINK,
                                           IN_MEMORY_OBJECTS, SQL_OBJECTS)},
}
WAIT_S = 1.0  # well inside the Runtime client's 30 s timeout; the SuperExec reconciles its apps between asks
MESSAGE_WAIT_S = 3.0  # a SuperNode's ask for a message: Flower's own idle wait, so idle sites ask no more often than
# with Flower's SuperNode (20 sites: under 7 asks a second) and still get each message the moment it is sent
# Asks held at once, per process: HTTP handlers run in the app's thread pool (anyio's 40 threads, shared
# with pushes, which must not wait for a free thread), the SuperLink's gRPC Fleet API in Flower's 1000.
RUNTIME_HOLDS = threading.BoundedSemaphore(16)
FLEET_HOLDS = threading.BoundedSemaphore(256)


class Bell:
    """A counter of events that waiting requests can sleep on."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._rung = 0

    @property
    def rung(self) -> int:
        with self._condition:
            return self._rung

    def ring(self) -> None:
        with self._condition:
            self._rung += 1
            self._condition.notify_all()

    def wait_past(self, seen: int, timeout: float) -> bool:
        """Sleep until the bell rang after ``seen`` or ``timeout`` passed; True when it rang."""
        with self._condition:
            return self._condition.wait_for(lambda: self._rung != seen, timeout=max(timeout, 0.0))


TASKS = Bell()  # a task was created
REPLIES = Bell()  # a site's reply was stored at the SuperLink
INSTRUCTIONS = Bell()  # a message for a site was stored at the SuperLink
OBJECTS = Bell()  # an object (a chunk of a model, a record) was stored


def held(handler: Callable[..., Any], bell: Bell, answered: Callable[[Any, Any], bool],
         holds: threading.BoundedSemaphore, wait_s: Callable[[], float] = lambda: WAIT_S) -> Callable[..., Any]:
    """``handler(request, state, ...)`` asked again whenever ``bell`` rings, until ``answered(request,
    response)`` or ``wait_s()`` seconds passed. Only as many asks as ``holds`` allows are held at
    once; the others are answered at once, as by Flower (a held ask keeps a server thread)."""

    def held_handler(*args: Any, **kwargs: Any) -> Any:  # Flower passes them by name or by position
        request = kwargs["request"] if "request" in kwargs else args[0]
        seen = bell.rung  # read before asking: what is stored meanwhile is not slept through
        response = handler(*args, **kwargs)
        if answered(request, response) or not holds.acquire(blocking=False):
            return response
        try:
            deadline = time.monotonic() + wait_s()
            while bell.wait_past(seen, deadline - time.monotonic()):  # Flower asked again only after a ring
                seen = bell.rung
                response = handler(*args, **kwargs)
                if answered(request, response):
                    break
            return response
        finally:
            holds.release()

    held_handler.fedreid_long_poll = True  # type: ignore[attr-defined]
    return held_handler


def ringing(method: Callable[..., Any], bell: Bell,
            stored: Callable[[Any], bool] = lambda result: result is not None) -> Callable[..., Any]:
    """A state or store method that rings ``bell`` whenever it stored something (``stored(result)``;
    a method that raises stored nothing)."""

    def ringing_method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        if stored(result):
            bell.ring()
        return result

    ringing_method.fedreid_long_poll = True  # type: ignore[attr-defined]
    return ringing_method


def task_given(request: Any, response: Any) -> bool:
    """An AcquireTask answer the caller can act on: a task, or an ask for no kind of task at all."""
    return response.HasField("task") or not (request.supported_task_types or request.agentapp_fab_hashes)


def replies_given(request: Any, response: Any) -> bool:
    """A ServerApp's PullMessages answer it can act on: some message, or an ask for none."""
    return bool(response.messages_list) or not request.message_ids


def messages_given(request: Any, response: Any) -> bool:
    """A SuperNode's PullMessages answer: a message for it."""
    return bool(response.messages_list)


def object_given(request: Any, response: Any) -> bool:
    """A PullObject answer the caller can act on: the object, or word that no such object is expected
    (only an object announced but not stored yet is worth waiting for)."""
    return response.object_available or not response.object_found


def _install(handlers: tuple[tuple[str, str], ...], answered: Callable[[Any, Any], bool], bell: Bell,
             storers: tuple[tuple[str, str], ...], storer: str,
             stored: Callable[[Any], bool] = lambda result: result is not None,
             wait_s: Callable[[], float] = lambda: WAIT_S) -> None:
    modules = import_flower_names(FLOWER_LONG_POLL_API, "server/long_polls.py")
    if all(getattr(getattr(modules[module], name), "fedreid_long_poll", False) for module, name in handlers):
        return
    for module_name, class_name in storers:
        owner = getattr(modules[module_name], class_name)
        if not getattr(getattr(owner, storer), "fedreid_long_poll", False):
            setattr(owner, storer, ringing(getattr(owner, storer), bell, stored))
    for module_name, name in handlers:
        holds = FLEET_HOLDS if module_name == FLEET_HANDLERS else RUNTIME_HOLDS
        setattr(modules[module_name], name, held(getattr(modules[module_name], name), bell, answered, holds, wait_s))


def install_task_wait() -> None:
    """Hold an empty AcquireTask until a task is created (idempotent). SuperLink and SuperNode."""
    _install(((CORE_HANDLERS, "acquire_task"),), task_given, TASKS, TASK_CREATORS, "create_task")


def install_reply_wait() -> None:
    """Hold the ServerApp's empty PullMessages until a reply is stored (idempotent). SuperLink."""
    _install(((LINK_HANDLERS, "pull_messages"),), replies_given, REPLIES, REPLY_STORERS, "store_message_res")


def install_message_wait() -> None:
    """Hold a SuperNode's empty PullMessages until a message is stored for anyone (idempotent). SuperLink."""
    _install(((FLEET_HANDLERS, "pull_messages"),), messages_given, INSTRUCTIONS, INSTRUCTION_STORERS,
             "store_message_ins", wait_s=lambda: MESSAGE_WAIT_S)


def install_object_wait() -> None:
    """Hold every PullObject for an object announced but not stored yet until it is (idempotent).
    SuperLink (the ServerApp's and the SuperNodes' pulls) and SuperNode (its worker's)."""
    _install(OBJECT_PULLS, object_given, OBJECTS, OBJECT_STORERS, "put", stored=lambda _result: True)
