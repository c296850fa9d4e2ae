"""Pauses at named points of a run, for fault tests only: they let a test kill the SuperLink at an
exact moment (between the aggregation and the checkpoint, say) instead of guessing with sleeps.

Off unless the ServerApp's environment sets ``FEDREID_TEST_PAUSE=<point>:<round>`` (for example
``recorded:2``) and ``FEDREID_TEST_PAUSE_MARKER=<file>``: on reaching that point in that round the
ServerApp writes the marker file and waits while it exists (at most ``MAX_PAUSE_S``): the test kills
the SuperLink meanwhile, or deletes the file to let the run go on. The environment reaches the
ServerApp from the process that starts `fedreid-server`.

Point ``recorded``: the round aggregated and its metrics line written, the checkpoint not yet (the
one moment where a crash leaves the files disagreeing; server/resume.py reconciles them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_VARIABLE = "FEDREID_TEST_PAUSE"
MARKER_VARIABLE = "FEDREID_TEST_PAUSE_MARKER"
MAX_PAUSE_S = 600.0


def pause_point(point: str, server_round: int) -> None:
    """Pause here if the environment asks for this point and round (a no-op otherwise)."""
    if os.environ.get(PAUSE_VARIABLE) != f"{point}:{server_round}":
        return
    marker = Path(os.environ.get(MARKER_VARIABLE, "") or "fedreid-paused")
    marker.write_text(f"{point}:{server_round} pid {os.getpid()}\n")
    deadline = time.monotonic() + MAX_PAUSE_S
    while marker.exists() and time.monotonic() < deadline:  # short sleeps: a signal raised in another
        time.sleep(0.2)  # thread (Flower's parent-process monitor) is handled only between them
