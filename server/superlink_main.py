"""`flower-superlink` with a SQLite busy timeout that suits a busy server (what `fedreid-server` runs).

Flower 1.39 opens its SQLite state with ``PRAGMA busy_timeout = 5000``: a writer that cannot get the
database within 5 s fails with "database is locked". With 20 SuperNodes on a 2-core server that
happened within the first round: object pushes, heartbeats and reply pushes failed with HTTP 500,
and a SuperNode whose reply push fails logs an error and drops the reply, so the site silently
missed the round. Waiting longer for the lock costs nothing when the database is idle, so this
entry point raises the timeout (``FEDREID_SQLITE_BUSY_TIMEOUT_MS``, default 120000) before handing
over to Flower's own `flower-superlink` main function, unchanged otherwise.
"""

from __future__ import annotations

import os
import sys

BUSY_TIMEOUT_VARIABLE = "FEDREID_SQLITE_BUSY_TIMEOUT_MS"
DEFAULT_BUSY_TIMEOUT_MS = 120_000


def set_sqlite_busy_timeout(busy_timeout_ms: int) -> None:
    """Make every SQLite connection Flower opens from now on wait ``busy_timeout_ms`` for a lock."""
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple((name, str(busy_timeout_ms) if name == "busy_timeout" else value)
                                     for name, value in sql_mixin.SQLITE_PRAGMAS)


def main() -> int:
    from flwr.superlink.cli import flower_superlink

    set_sqlite_busy_timeout(int(os.environ.get(BUSY_TIMEOUT_VARIABLE, DEFAULT_BUSY_TIMEOUT_MS)))
    sys.argv[0] = "flower-superlink"  # Flower names the process's telemetry event after it
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
