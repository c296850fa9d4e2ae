"""`flower-superlink` with a SQLite busy timeout that suits a busy server (what `fedreid-server` runs).

Flower 1.39 opens its SQLite state with ``PRAGMA busy_timeout = 5000``: a writer that cannot get the
database within 5 s fails with "database is locked". With 20 SuperNodes on a 2-core server that
happened within the first round: object pushes, heartbeats and reply pushes failed with HTTP 500,
and a SuperNode whose reply push fails logs an error and drops the reply, so the site silently
missed the round. Waiting longer for the lock costs nothing when the database is idle, so this
entry point raises the timeout (``FEDREID_SQLITE_BUSY_TIMEOUT_MS``, default 120000) before handing
over to Flower's own `flower-superlink` main function, unchanged otherwise.

Message payloads (Flower's ObjectStore: a model's chunks, in flight between the ServerApp and the
sites) are kept in memory by default (``FEDREID_PAYLOADS=memory``), while runs, nodes and the sites'
registered keys stay in the SQLite ``--database``: Flower 1.39 puts both in the database, and
writing and reading every 5 MiB chunk through SQLite took 4.6 s of an 11 s round that moves six
98 MB messages (bench/round_overhead.py). Nothing of a payload is worth keeping across a restart:
a restarted SuperLink ends the runs that were going on, and a run resumes from its own checkpoint
(server/resume.py). ``FEDREID_PAYLOADS=database`` (``fedreid-server --payloads database``) keeps
Flower's behaviour, for a server with little memory to spare: in memory, the SuperLink holds one
copy of the global model plus the replies not yet pulled by the ServerApp.

It also quiets the HTTP access log: Flower logs every request to its Control/Runtime API, and the
ServerApp polls `pull-messages` ten times a second, so in a `docker compose up` log 699 of 1,710
lines were access lines. Successful requests are dropped from that log unless
``FEDREID_ACCESS_LOG=1`` (`fedreid-server --access-log`); failed ones (status 400 and up) stay.

Flower's SQLite bookkeeping (expiring task tokens ten times a second, a run-status read and a
traffic write for every 5 MiB chunk) is written less often: server/link_bookkeeping.py. A request's
body crosses Flower's HTTP middleware in one piece instead of hundreds: server/whole_bodies.py; and
a Runtime API request skips the four Control API layers that only pass it on: server/runtime_fast_path.py;
the SuperExec's ``AcquireTask`` and the ServerApp's ``PullMessages`` wait for their answer instead
of being answered empty ten times a second: server/long_polls.py.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from server import link_bookkeeping, long_polls, push_sessions, runtime_fast_path, whole_bodies

BUSY_TIMEOUT_VARIABLE = "FEDREID_SQLITE_BUSY_TIMEOUT_MS"
DEFAULT_BUSY_TIMEOUT_MS = 120_000
ACCESS_LOG_VARIABLE = "FEDREID_ACCESS_LOG"
PAYLOADS_VARIABLE = "FEDREID_PAYLOADS"
PAYLOAD_STORES = ("memory", "database")
FLOWER_SUPERLINK_API = {  # every Flower name used here, checked by check_flower_api
    "flwr.superlink.main": ["get_objectstore_linkstate_factories", "create_app"],
    "flwr.supercore.object_store": ["ObjectStoreFactory"],
    "flwr.server.superlink.linkstate": ["LinkStateFactory"],
    "flwr.supercore.constant": ["FLWR_IN_MEMORY_DB_NAME"],
    "flwr.supercore.sql_mixin": ["SQLITE_PRAGMAS"],
    "flwr.supercore.logger": ["update_console_handler"],
    "flwr.superlink.cli.flower_superlink": ["get_uvicorn_log_config"],
    "flwr.superlink.cli": ["flower_superlink"],
}


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


def check_flower_api() -> None:
    """Refuse a Flower that lacks a name this module (or server/link_bookkeeping.py) patches or calls
    (pin flwr==1.39.*)."""
    from server.flower_names import import_flower_names

    import_flower_names(FLOWER_SUPERLINK_API, "server/superlink_main.py")
    import_flower_names(link_bookkeeping.FLOWER_BOOKKEEPING_API, "server/link_bookkeeping.py")
    import_flower_names(push_sessions.FLOWER_PUSH_SESSION_API, "server/push_sessions.py")
    import_flower_names(runtime_fast_path.FLOWER_FAST_PATH_API, "server/runtime_fast_path.py")


def keep_payloads_in_memory() -> None:
    """Keep message payloads (Flower's ObjectStore) in memory; runs, nodes and keys stay in ``--database``."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.superlink import main as superlink_main

    def factories(database: str, federation_manager: Any) -> tuple[ObjectStoreFactory, LinkStateFactory]:
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    superlink_main.get_objectstore_linkstate_factories = factories


def main() -> int:
    from flwr.superlink.cli import flower_superlink
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)
    payloads = os.environ.get(PAYLOADS_VARIABLE, "memory")
    if payloads not in PAYLOAD_STORES:
        raise SystemExit(f"{PAYLOADS_VARIABLE}={payloads!r}: use one of {', '.join(PAYLOAD_STORES)}")
    check_flower_api()
    if payloads == "memory":
        keep_payloads_in_memory()
        push_sessions.install()  # their upload bookkeeping too: nothing of it outlives the process either
    link_bookkeeping.install()  # fewer SQLite writes: token expiry, run status and traffic per object
    whole_bodies.install("flwr.superlink.main")  # pushed model chunks cross the HTTP middleware in one piece
    runtime_fast_path.install()  # Runtime requests skip the Control API's pass-through middleware
    long_polls.install_task_wait()  # the SuperExec's ask for a run is held until one is submitted
    long_polls.install_reply_wait()  # the ServerApp's ask for replies is held until one arrives
    long_polls.install_message_wait()  # a SuperNode's ask for a message, until one is sent
    long_polls.install_object_wait()  # and anyone's pull of an object still on its way, until it is stored

    set_sqlite_busy_timeout(int(os.environ.get(BUSY_TIMEOUT_VARIABLE, DEFAULT_BUSY_TIMEOUT_MS)))
    if os.environ.get(ACCESS_LOG_VARIABLE) != "1":
        install_quiet_access_log()
    sys.argv[0] = "flower-superlink"  # Flower names the process's telemetry event after it
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
