"""The file that lets the next site worker answer for a task the previous one could not finish.

While a task runs, the worker keeps ``<state-dir>/task-in-progress.json`` (mode 0600): the task's
token and a ready error reply. Its ``phase`` says how far the task got: ``running`` (a worker that
starts finds the file and sends the error reply, so the server names the site as failed at once
instead of after Flower's 60-s heartbeat expiry) or ``replying`` (the reply was being handed to
the SuperNode, which waits for the rest of a half-sent reply for ever: fedreid-client then
restarts the SuperNode as well). A task past the site's time budget (``deadline``) is stopped: the
worker's own watchdog, or fedreid-client when the worker no longer responds, marks the file
``over_budget`` and ends the worker, and the next one sends the over-budget reply instead. Plain JSON and the standard library only: fedreid-client, which
imports neither Flower nor torch, reads it too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("clients.executor")
FILE_NAME = "task-in-progress.json"


class AnswerOnDeath:
    """The task-in-progress file of one state folder."""

    RUNNING, REPLYING = "running", "replying"

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE_NAME

    def arm(self, token: str, reply: bytes, run_id: int, node_id: int, over_budget_reply: bytes = b"",
            deadline: float | None = None) -> None:
        """A task has started: ``reply`` is the serialised error reply to send if this worker dies,
        ``over_budget_reply`` the one for a task stopped at ``deadline`` (time.time())."""
        self._write({"token": token, "reply": base64.b64encode(reply).decode(), "run_id": run_id,
                     "node_id": node_id, "phase": self.RUNNING, "deadline": deadline,
                     "over_budget_reply": base64.b64encode(over_budget_reply).decode()})

    def mark_over_budget(self) -> None:
        """The task is being stopped for its time: the next worker sends the over-budget reply."""
        saved = self.saved()
        if saved is not None:
            self._write({**saved, "over_budget": True})

    def overdue(self, now: float, grace: float) -> bool:
        """True when a task is still running ``grace`` seconds after its deadline."""
        saved = self.saved()
        deadline = saved.get("deadline") if saved is not None else None
        return saved is not None and saved.get("phase") == self.RUNNING and isinstance(deadline, (int, float)) \
            and now > deadline + grace

    def mark_replying(self) -> None:
        saved = self.saved()
        if saved is not None:
            self._write({**saved, "phase": self.REPLYING})

    def phase(self) -> str | None:
        saved = self.saved()
        return None if saved is None else str(saved.get("phase", self.RUNNING))

    def reply(self, saved: dict[str, object]) -> bytes:
        if saved.get("over_budget") and saved.get("over_budget_reply"):
            return base64.b64decode(str(saved["over_budget_reply"]))
        return base64.b64decode(str(saved["reply"]))

    def saved(self) -> dict[str, object] | None:
        try:
            return dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as error:
            log.warning("ignoring an unreadable %s (%s)", self.path, error)
            return None

    def disarm(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self, saved: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(saved, handle)
        os.replace(temporary, self.path)
