"""A call that may not finish in time, run where it cannot hold the round loop past its deadline.

Flower's HttpGrid, pulling a reply whose upload was cut off (a site box that died while sending),
keeps fetching that reply's objects until the SuperLink's push session expires (180 s) or its own
limit (2 h) passes, and meanwhile the ServerApp's main thread executes no Python code, so it
neither keeps its deadline nor handles the signal Flower raises when the SuperLink under it has
died: a ServerApp orphaned that way was seen running on for minutes against the restarted
SuperLink, holding its run folder. Grid calls therefore run in a daemon thread, and the caller
waits in short slices up to the deadline.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
SLICE_S = 0.5  # the longest the caller goes without running Python code (signal handlers run between)


class Outcome(Generic[T]):
    """What a bounded call gave: ``finished`` and its ``value``, or not finished (it still runs, unowned)."""

    def __init__(self, finished: bool, value: T | None = None) -> None:
        self.finished = finished
        self.value = value


def call_within(function: Callable[[], T], deadline: float) -> Outcome[T]:
    """``function()`` in a daemon thread, waited for until ``deadline`` (``time.monotonic()`` seconds);
    its exception, if it raised one in time, is raised here."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            box["error"] = error

    worker = threading.Thread(target=target, daemon=True, name="bounded-call")
    worker.start()
    while worker.is_alive() and time.monotonic() < deadline:
        worker.join(timeout=min(SLICE_S, max(deadline - time.monotonic(), 0.01)))
    if worker.is_alive():
        return Outcome(False)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return Outcome(True, box["value"])  # type: ignore[arg-type]
