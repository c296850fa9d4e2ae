"""``AcquireTask`` that waits for work: answered the moment a task is created, or empty after ``WAIT_S``.

Flower 1.39's executors ask their Runtime API for a task in a loop: each site worker asks its
SuperNode (clients/executor.py, every 0.05 s while a run is going) and the SuperLink's SuperExec
asks the SuperLink (every 0.1 s, server/flower_cli.py). Answered empty at once, every ask is an
HTTP request on both sides. Traced on this 2-core box (bench/round_trace.py, 3 TLS sites): about 150
such requests a round, 1.7-2.0 s of request time, most of it while the model crosses the same
processes. With the wait, an idle executor asks about once a second, and a new task reaches it as
soon as it exists instead of at its next poll.

``install`` wraps Flower's shared ``acquire_task`` handler (the SuperNode's and the SuperLink's
Runtime API both call it) and the ``create_task`` of both state implementations, which ring a bell
that wakes every waiting request. A process installs it before Flower builds its app; an executor
that does not expect the wait still works (it gets its task, or an empty answer after ``WAIT_S``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from server.flower_cli import import_flower_names

HANDLERS_MODULE = "flwr.supercore.servicer.runtime.runtime_handlers"
FLOWER_TASK_BELL_API = {
    HANDLERS_MODULE: ["acquire_task"],  # called by both Runtime APIs as core_runtime_handlers.acquire_task
    "flwr.supercore.corestate.in_memory_corestate": ["InMemoryCoreState"],  # create_task: the SuperNode's
    "flwr.supercore.corestate.sql_corestate": ["SqlCoreState"],  # and the SuperLink's states (SQLite or memory)
}
STATE_CLASSES = (("flwr.supercore.corestate.in_memory_corestate", "InMemoryCoreState"),
                 ("flwr.supercore.corestate.sql_corestate", "SqlCoreState"))
WAIT_S = 1.0  # well inside the Runtime client's 30 s timeout; the SuperExec reconciles its apps between asks


class TaskBell:
    """A counter of created tasks that waiting requests can sleep on."""

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


BELL = TaskBell()


def waiting_acquire(acquire: Callable[[Any, Any], Any], bell: TaskBell = BELL,
                    wait_s: float = WAIT_S) -> Callable[[Any, Any], Any]:
    """``acquire`` (Flower's handler) asked again whenever a task is created, until one is given or ``wait_s`` passed."""

    def acquire_task(request: Any, state: Any) -> Any:
        deadline = time.monotonic() + wait_s
        while True:
            seen = bell.rung  # read before asking: a task created meanwhile is not slept through
            response = acquire(request, state)
            asks_for_something = bool(request.supported_task_types or request.agentapp_fab_hashes)
            if response.HasField("task") or not asks_for_something or not bell.wait_past(
                    seen, deadline - time.monotonic()):
                return response

    acquire_task.fedreid_task_bell = True  # type: ignore[attr-defined]
    return acquire_task


def ringing_create(create: Callable[..., Any], bell: TaskBell = BELL) -> Callable[..., Any]:
    """Flower's ``create_task``, ringing ``bell`` for every task it creates."""

    def create_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        task_id = create(self, *args, **kwargs)
        if task_id is not None:
            bell.ring()
        return task_id

    create_task.fedreid_task_bell = True  # type: ignore[attr-defined]
    return create_task


def install() -> None:
    """Make this process's Runtime API answer ``AcquireTask`` as described above (idempotent)."""
    modules = import_flower_names(FLOWER_TASK_BELL_API, "server/task_bell.py")
    handlers = modules[HANDLERS_MODULE]
    if getattr(handlers.acquire_task, "fedreid_task_bell", False):
        return
    for module_name, class_name in STATE_CLASSES:
        state_class = getattr(modules[module_name], class_name)
        state_class.create_task = ringing_create(state_class.create_task)
    handlers.acquire_task = waiting_acquire(handlers.acquire_task)
