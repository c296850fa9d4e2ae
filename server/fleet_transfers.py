"""The SuperLink's bookkeeping per transferred object, taken out of SQLite's way.

Flower 1.39's Fleet API does two database writes and one read for every object a SuperNode
pulls or pushes (a model's 5 MiB chunks, its arrays, records and message): ``check_abort`` reads
the run's status through ``get_run_status``, which first runs two UPDATEs that expire old task
tokens, and ``store_traffic`` adds the object's bytes to the run's counters. With three sites
moving a 20 MB model each way, that is about a hundred write transactions a round, from as many
threads, on one SQLite file: they queue for its lock, and in a profile of the SuperLink they took
more time than the transfers (bench/round_overhead.py: 0.5-0.7 s of a round's overhead).

Two changes, both on the Fleet path only (the ServerApp's and the Control API's calls are untouched):

- ``cache_running_status``: a run found RUNNING is believed running for ``ttl_s`` (0.5 s) before
  the database is asked again. A run that stops is noticed that much later by a transfer already
  under way; one that is not running yet, or has finished, is checked every time.
- ``buffer_traffic``: byte counts are added up in memory and written once per ``every_s``
  (0.5 s) per run, so ``flwr ls`` shows a run's traffic at most that late. Counts not yet written
  when the SuperLink stops are lost (at most half a second's worth).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any, Callable

log = logging.getLogger("server.fleet_transfers")
RUN_STATUS_TTL_S = 0.5
TRAFFIC_FLUSH_S = 0.5
FLEET_HANDLERS = "flwr.server.superlink.fleet.message_handler.message_handler"
SQL_LINKSTATE = "flwr.server.superlink.linkstate.sql_linkstate"
# What this module takes from Flower (checked at start with the rest of FLOWER_SUPERLINK_API).
FLOWER_FLEET_API = {FLEET_HANDLERS: ["check_abort", "pull_object", "push_object"],
                    SQL_LINKSTATE: ["SqlLinkState"]}

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


def install() -> None:
    """Put both changes into the SuperLink's Fleet handlers (before the SuperLink starts)."""
    import importlib

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
