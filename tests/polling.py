"""Something polled on a daemon thread for as long as a ``with`` block runs (load tests, benches)."""

from __future__ import annotations

import threading


class Polling:
    """Calls ``poll`` every ``interval`` seconds from ``__enter__`` until ``__exit__``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def __enter__(self) -> "Polling":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
