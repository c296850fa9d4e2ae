"""Object-push sessions kept where the payloads are: in memory (``FEDREID_PAYLOADS=memory``).

Flower 1.39's SQL state records every upload in SQLite: a row per push session, per root object
and per object still to come, claimed and counted down as each object (a 5 MiB chunk of a model,
an array, a record, the message) arrives, three or four statements and a commit per object. With
3 sites moving a 20 MB model, the SuperLink spent 0.55-0.8 s of every round in ``store_object``
(bench/round_trace.py, summed over its threads), much of it while the ServerApp's push of the
next model, the longest part of a round's overhead, waited for it.

When the payloads themselves are kept in memory (server/superlink_main.py), a push session's rows
are worth no more than the objects they track: a restarted SuperLink has lost both. So the
sessions move to memory with them, using Flower's own in-memory bookkeeping (the methods of
``InMemoryCoreState`` named in ``SESSION_METHODS``, unchanged); runs, nodes and the sites' keys
stay in SQLite. An expired session still deletes its messages through the SQL state's own
``_on_push_session_expired``.
"""

from __future__ import annotations

import importlib
from threading import RLock
from typing import Any

IN_MEMORY_CORESTATE = "flwr.supercore.corestate.in_memory_corestate"
SQL_CORESTATE = "flwr.supercore.corestate.sql_corestate"
SESSION_METHODS = ("start_session", "delete_sessions_in_run", "preregister_object_tree", "store_object",
                   "get_object", "_cleanup_push_session")
SESSION_ATTRIBUTES = ("_object_push_sessions", "_object_push_session_by_root", "_lock_object_push_sessions")
FLOWER_PUSH_SESSION_API = {IN_MEMORY_CORESTATE: ["InMemoryCoreState"], SQL_CORESTATE: ["SqlCoreState"]}


def check_flower_api() -> tuple[type, type]:
    """Flower's in-memory and SQL core states, if both still have every session method used here
    and the in-memory one still keeps its sessions in the attributes set up by ``install``."""
    import inspect

    memory = importlib.import_module(IN_MEMORY_CORESTATE).InMemoryCoreState
    sql = importlib.import_module(SQL_CORESTATE).SqlCoreState
    missing = [f"{cls.__name__}.{name}" for cls in (memory, sql) for name in SESSION_METHODS if not hasattr(cls, name)]
    source = inspect.getsource(memory.__init__)
    missing += [f"InMemoryCoreState.{name}" for name in SESSION_ATTRIBUTES if f"self.{name}" not in source]
    if missing:
        raise RuntimeError(f"the installed Flower lacks {', '.join(missing)}; update server/push_sessions.py "
                           "(pin flwr==1.39.*)")
    return memory, sql


def install() -> None:
    """Make every SQL core state (the SuperLink's LinkState) keep its push sessions in memory."""
    memory, sql = check_flower_api()
    if getattr(sql, "fedreid_sessions_in_memory", False):
        return
    for name in SESSION_METHODS:
        setattr(sql, name, getattr(memory, name))
    original_init = sql.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._object_push_sessions = {}  # session id -> InMemoryCoreState's ObjectPushSession
        self._object_push_session_by_root = {}  # root object id -> session id
        self._lock_object_push_sessions = RLock()

    sql.__init__ = __init__
    sql.fedreid_sessions_in_memory = True
