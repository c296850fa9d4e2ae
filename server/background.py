"""Model files written beside the round loop instead of inside it.

A round's checkpoint, ``model.pt`` and (with clusters) the sites' models are 2 x 20 MB for the
small model and 2 x 100 MB for ResNet-50; written in the loop they held up the next round's
messages by 0.1-0.2 s on the test box (bench/round_overhead.py); the plot and the report of an
evaluated round took another 0.3 s (matplotlib), so they follow the files. They are written in one worker
thread, in submission order; ``wait`` returns once everything submitted is on disk and raises what
a write raised. The ServerApp waits before each round's metrics line, so the files of round r are
complete before the line of round r + 1 exists (the order server/resume.py relies on), and before
it finishes.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class BackgroundWrites:
    """One thread that runs the submitted writes in order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-files")
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()

    def submit(self, write: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(self._pool.submit(write))

    def wait(self) -> None:
        """Block until every submitted write is done; re-raise the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()
