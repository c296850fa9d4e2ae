"""The SuperLink's SQLite bookkeeping, written less often: it competed with the model's transfers.

Flower 1.39 keeps runs, tasks and push sessions in one SQLite file and writes it far more often
than they change. Counted over a 50-s run of three sites (bench/round_overhead.py's deployment):
about 1,100 UPDATEs that expire old task tokens (``_cleanup_expired_task_tokens`` runs before every
task poll of the SuperExec, ten a second, and before every run-status read), and for every object
a SuperNode pulls or pushes (a model's 5 MiB chunks, its arrays, records and message) a run-status
read, itself preceded by that cleanup, plus an UPDATE of the run's traffic counters. Writers
queue for the file's lock, from many threads, while the round waits for its arrays.

Three changes, each keeping what Flower computes, only later or less often:

- ``RunningStatusCache``: a run found RUNNING is believed running for ``ttl_s`` (0.5 s) before
  the database is asked again. A run that stops is noticed that much later by a transfer already
  under way; one that is not running yet, or has finished, is checked every time. (Fleet path only.)
- ``TrafficBuffer``: byte counts are added up in memory and written once per ``every_s``
  (0.5 s) per run, so ``flwr ls`` shows a run's traffic at most that late. Counts not yet written
  when the SuperLink stops are lost (at most half a second's worth).
- ``AtMostEvery``: expired task tokens are looked for at most every 0.5 s instead of at every
  call, so a task whose heartbeat stopped is failed (and a claim that never started is freed) up
  to half a second later; Flower's heartbeats are tens of seconds apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any, Callable

log = logging.getLogger("server.link_bookkeeping")
RUN_STATUS_TTL_S = 0.5
TRAFFIC_FLUSH_S = 0.5
TOKEN_CLEANUP_S = 0.5
FLEET_HANDLERS = "flwr.server.superlink.fleet.message_handler.message_handler"
SQL_LINKSTATE = "flwr.server.superlink.linkstate.sql_linkstate"
SQL_CORESTATE = "flwr.supercore.corestate.sql_corestate"
# What this module takes from Flower (checked at start with the rest of FLOWER_SUPERLINK_API).
FLOWER_BOOKKEEPING_API = {FLEET_HANDLERS: ["check_abort", "pull_object", "push_object"],
                          SQL_LINKSTATE: ["SqlLinkState"],
                          SQL_CORESTATE: ["SqlCoreState"]}

AbortCheck = Callable[[int, list[str], Any], "str | None"]


class RunningStatusCache:
    """``check_abort`` that remembers, per run, a "running" answer (None) for ``ttl_s`` seconds."""

    def __init__(self, check: AbortCheck, ttl_s: float = RUN_STATUS_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.check, self.ttl_s, self.clock = check, ttl_s, clock
        self._running_until: dict[tuple[int, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()

    def __call__(self, run_id: int, abort_status_list: list[str], state: Any) -> str | None:
        key = (run_id, tuple(abort_status_list))
        now = self.clock()
        with self._lock:
            if self._running_until.get(key, 0.0) > now:
                return None
        verdict = self.check(run_id, abort_status_list, state)
        with self._lock:
            if verdict is None:
                self._running_until[key] = now + self.ttl_s
            else:
                self._running_until.pop(key, None)
        return verdict


class TrafficBuffer:
    """Byte counts per run, added up in memory and handed to ``write`` every ``every_s`` seconds
    by a daemon thread (and by ``flush``)."""

    def __init__(self, write: Callable[[int, int, int], None], every_s: float = TRAFFIC_FLUSH_S) -> None:
        self.write, self.every_s = write, every_s
        self._pending: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, run_id: int, bytes_sent: int, bytes_recv: int) -> None:
        if bytes_sent < 0 or bytes_recv < 0:  # Flower's own check, kept at the call
            raise ValueError(f"Negative traffic values for run {run_id}: bytes_sent={bytes_sent}, "
                             f"bytes_recv={bytes_recv}")
        with self._lock:
            counts = self._pending[run_id]
            counts[0] += bytes_sent
            counts[1] += bytes_recv
            if self._thread is None:
                self._thread = threading.Thread(target=self._flush_forever, daemon=True, name="traffic-flush")
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0])
        for run_id, (sent, received) in pending.items():
            if sent or received:
                try:
                    self.write(run_id, sent, received)
                except Exception as error:  # noqa: BLE001 - a run deleted meanwhile: its counts are moot
                    log.warning("traffic of run %d not recorded: %s", run_id, error)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.every_s)
            self.flush()


class AtMostEvery:
    """A method that runs at most once per ``every_s`` seconds per object; calls in between return
    at once (the method's work is periodic upkeep, so a skipped call loses nothing)."""

    def __init__(self, method: Callable[[Any], None], every_s: float = TOKEN_CLEANUP_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.method, self.every_s, self.clock = method, every_s, clock
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[[], None]:
        return lambda: self(instance)

    def __call__(self, instance: Any) -> None:
        now = self.clock()
        with self._lock:
            if now - self._last.get(id(instance), float("-inf")) < self.every_s:
                return
            self._last[id(instance)] = now
        self.method(instance)


def install() -> None:
    """Put the three changes into the SuperLink's state and Fleet handlers (before it starts)."""
    import importlib

    core_state = importlib.import_module(SQL_CORESTATE).SqlCoreState
    core_state._cleanup_expired_task_tokens = AtMostEvery(core_state._cleanup_expired_task_tokens)  # noqa: SLF001
    handlers = importlib.import_module(FLEET_HANDLERS)
    handlers.check_abort = RunningStatusCache(handlers.check_abort)
    linkstate_class = importlib.import_module(SQL_LINKSTATE).SqlLinkState
    write = linkstate_class.store_traffic
    buffers: dict[int, TrafficBuffer] = {}  # one per state object (the SuperLink has one)
    lock = threading.Lock()

    def store_traffic(self: Any, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        with lock:
            buffer = buffers.get(id(self))
            if buffer is None:
                buffer = buffers[id(self)] = TrafficBuffer(
                    lambda run, sent, received: write(self, run, bytes_sent=sent, bytes_recv=received))
        buffer.add(run_id, bytes_sent, bytes_recv)

    linkstate_class.store_traffic = store_traffic
