"""Two Runtime API asks that wait for their answer: ``AcquireTask`` and the ServerApp's ``PullMessages``.

Flower 1.39 answers both at once, empty when there is nothing yet, and its callers ask in a loop:
each site worker asks its SuperNode for a task (clients/executor.py, every 0.05 s while a run is
going), the SuperLink's SuperExec asks the SuperLink (every 0.1 s, server/flower_cli.py), and the
ServerApp asks the SuperLink for the sites' replies (every ``federation.poll_interval_s``, 0.1 s).
Every empty answer is an HTTP request on both sides. Traced on this 2-core box (bench/round_trace.py,
3 TLS sites): about 150 task asks and 30 reply asks a round, in the same processes that carry the
model meanwhile, and each new task or reply waits for the next ask.

Here an empty ask is held until something it could return appears, or ``WAIT_S`` passed: Flower's
own handler is asked again whenever a bell rings. ``create_task`` of both state implementations
rings the task bell; ``store_message_res`` of both link states rings the reply bell. A caller that
does not expect the wait still works: it gets its answer, or an empty one after ``WAIT_S``.
``install_task_wait`` is run by the SuperLink and every SuperNode (server/superlink_main.py,
clients/supernode.py), ``install_reply_wait`` by the SuperLink, each before Flower builds its app.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from server.flower_cli import import_flower_names

CORE_HANDLERS = "flwr.supercore.servicer.runtime.runtime_handlers"  # both Runtime APIs call its acquire_task
LINK_HANDLERS = "flwr.superlink.servicer.runtime.runtime_handlers"  # the SuperLink's pull_messages
FLOWER_LONG_POLL_API = {
    CORE_HANDLERS: ["acquire_task"],
    LINK_HANDLERS: ["pull_messages"],
    "flwr.supercore.corestate.in_memory_corestate": ["InMemoryCoreState"],  # create_task: the SuperNode's state
    "flwr.supercore.corestate.sql_corestate": ["SqlCoreState"],  # and the SuperLink's (SQLite or in memory)
    "flwr.server.superlink.linkstate.in_memory_linkstate": ["InMemoryLinkState"],  # store_message_res
    "flwr.server.superlink.linkstate.sql_linkstate": ["SqlLinkState"],
}
TASK_CREATORS = (("flwr.supercore.corestate.in_memory_corestate", "InMemoryCoreState"),
                 ("flwr.supercore.corestate.sql_corestate", "SqlCoreState"))
REPLY_STORERS = (("flwr.server.superlink.linkstate.in_memory_linkstate", "InMemoryLinkState"),
                 ("flwr.server.superlink.linkstate.sql_linkstate", "SqlLinkState"))
WAIT_S = 1.0  # well inside the Runtime client's 30 s timeout; the SuperExec reconciles its apps between asks


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
REPLIES = Bell()  # a reply message was stored


def held(handler: Callable[..., Any], bell: Bell, answered: Callable[[Any, Any], bool],
         wait_s: Callable[[], float] = lambda: WAIT_S) -> Callable[..., Any]:
    """``handler(request, state, ...)`` asked again whenever ``bell`` rings, until ``answered(request,
    response)`` or ``wait_s()`` seconds passed."""

    def held_handler(request: Any, state: Any, *rest: Any) -> Any:
        deadline = time.monotonic() + wait_s()
        while True:
            seen = bell.rung  # read before asking: what happens meanwhile is not slept through
            response = handler(request, state, *rest)
            if answered(request, response) or not bell.wait_past(seen, deadline - time.monotonic()):
                return response

    held_handler.fedreid_long_poll = True  # type: ignore[attr-defined]
    return held_handler


def ringing(method: Callable[..., Any], bell: Bell) -> Callable[..., Any]:
    """A state method that rings ``bell`` whenever it stored something (returned other than None)."""

    def ringing_method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        if result is not None:
            bell.ring()
        return result

    ringing_method.fedreid_long_poll = True  # type: ignore[attr-defined]
    return ringing_method


def task_given(request: Any, response: Any) -> bool:
    """An AcquireTask answer the caller can act on: a task, or an ask for no kind of task at all."""
    return response.HasField("task") or not (request.supported_task_types or request.agentapp_fab_hashes)


def replies_given(request: Any, response: Any) -> bool:
    """A PullMessages answer the caller can act on: some message, or an ask for none."""
    return bool(response.messages_list) or not request.message_ids


def _install(handlers_module: str, handler: str, answered: Callable[[Any, Any], bool], bell: Bell,
             storers: tuple[tuple[str, str], ...], storer: str) -> None:
    modules = import_flower_names(FLOWER_LONG_POLL_API, "server/long_polls.py")
    handlers = modules[handlers_module]
    if getattr(getattr(handlers, handler), "fedreid_long_poll", False):
        return
    for module_name, class_name in storers:
        state_class = getattr(modules[module_name], class_name)
        setattr(state_class, storer, ringing(getattr(state_class, storer), bell))
    setattr(handlers, handler, held(getattr(handlers, handler), bell, answered))


def install_task_wait() -> None:
    """Hold an empty AcquireTask until a task is created (idempotent)."""
    _install(CORE_HANDLERS, "acquire_task", task_given, TASKS, TASK_CREATORS, "create_task")


def install_reply_wait() -> None:
    """Hold an empty PullMessages until a reply is stored (idempotent)."""
    _install(LINK_HANDLERS, "pull_messages", replies_given, REPLIES, REPLY_STORERS, "store_message_res")
