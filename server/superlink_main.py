"""`flower-superlink` with a SQLite busy timeout that suits a busy server (what `fedreid-server` runs).

Flower 1.39 opens its SQLite state with ``PRAGMA busy_timeout = 5000``: a writer that cannot get the
database within 5 s fails with "database is locked". With 20 SuperNodes on a 2-core server that
happened within the first round: object pushes, heartbeats and reply pushes failed with HTTP 500,
and a SuperNode whose reply push fails logs an error and drops the reply, so the site silently
missed the round. Waiting longer for the lock costs nothing when the database is idle, so this
entry point raises the timeout (``FEDREID_SQLITE_BUSY_TIMEOUT_MS``, default 120000) before handing
over to Flower's own `flower-superlink` main function, unchanged otherwise.

It also quiets the HTTP access log: Flower logs every request to its Control/Runtime API, and the
ServerApp polls `pull-messages` ten times a second, so in a `docker compose up` log 699 of 1,710
lines were access lines. Successful requests are dropped from that log unless
``FEDREID_ACCESS_LOG=1`` (`fedreid-server --access-log`); failed ones (status 400 and up) stay.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

BUSY_TIMEOUT_VARIABLE = "FEDREID_SQLITE_BUSY_TIMEOUT_MS"
DEFAULT_BUSY_TIMEOUT_MS = 120_000
ACCESS_LOG_VARIABLE = "FEDREID_ACCESS_LOG"


class FailedRequestsOnly(logging.Filter):
    """Keeps uvicorn access records of failed requests (status >= 400); drops the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        status = record.args[4] if isinstance(record.args, tuple) and len(record.args) >= 5 else None
        try:
            return int(status) >= 400  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return True  # not an access record as uvicorn writes them: keep it


def quiet_access_log(log_config: dict[str, Any]) -> dict[str, Any]:
    """Flower's uvicorn logging configuration with :class:`FailedRequestsOnly` on the access log."""
    log_config.setdefault("filters", {})["failed_only"] = {"()": FailedRequestsOnly}
    log_config["handlers"]["access"].setdefault("filters", []).append("failed_only")
    return log_config


def install_quiet_access_log() -> None:
    """Make `flower-superlink` start uvicorn with :func:`quiet_access_log` applied."""
    module = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package exports a function
    flower_config = module.get_uvicorn_log_config                            # of the same name
    module.get_uvicorn_log_config = lambda level: quiet_access_log(flower_config(level))


def set_sqlite_busy_timeout(busy_timeout_ms: int) -> None:
    """Make every SQLite connection Flower opens from now on wait ``busy_timeout_ms`` for a lock."""
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple((name, str(busy_timeout_ms) if name == "busy_timeout" else value)
                                     for name, value in sql_mixin.SQLITE_PRAGMAS)


def main() -> int:
    from flwr.superlink.cli import flower_superlink

    set_sqlite_busy_timeout(int(os.environ.get(BUSY_TIMEOUT_VARIABLE, DEFAULT_BUSY_TIMEOUT_MS)))
    if os.environ.get(ACCESS_LOG_VARIABLE) != "1":
        install_quiet_access_log()
    sys.argv[0] = "flower-superlink"  # Flower names the process's telemetry event after it
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
