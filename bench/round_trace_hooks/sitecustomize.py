"""bench/round_trace.py's hooks: on PYTHONPATH of every process of a traced deployment, they time a
few Flower functions (wall-clock start and end, one JSON line per call, appended to the file named
by FEDREID_ROUND_TRACE). Nothing is changed but the timing; without that variable nothing is hooked."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time
from typing import Any, Callable

TRACE_VARIABLE = "FEDREID_ROUND_TRACE"
HOOKED = {  # module: (class or None, function) pairs; the label is "<class or module tail>.<function>"
    "flwr.superlink.grid.http_grid": [("HttpGrid", "push_messages"), ("HttpGrid", "pull_messages"),
                                      ("HttpGrid", "get_node_ids"), ("HttpGrid", "get_nodes"),
                                      ("HttpGrid", "_try_push_messages")],
    "server.rounds": [("FederationRunner", "_report"), (None, "wait_for_sites")],
    "strategies.fedpav": [("FedPav", "aggregate_train"), ("FedPav", "_screen_wild"), ("FedPav", "configure_train"),
                          ("FedPav", "check_train_reply_early"), (None, "average")],
    "strategies.wire": [(None, "message_wire_bytes")],
    "flwr.server.superlink.fleet.grpc_rere.fleet_servicer": [("FleetServicer", "PushMessages"),
                                                             ("FleetServicer", "PushObject")],
    "flwr.supercore.corestate.sql_corestate": [("SqlCoreState", "store_object")],
    "flwr.supercore.corestate.in_memory_corestate": [("InMemoryCoreState", "store_object")],  # push_sessions.py
    "flwr.supercore.object_store.in_memory_object_store": [("InMemoryObjectStore", "put")],
    "flwr.supernode.start_client_internal": [(None, "_pull_and_store_message")],
    "flwr.server.superlink.fleet.message_handler.message_handler": [(None, "pull_object")],
    "flwr.supercore.runtime.runtime_http_client": [("RuntimeHttpClient", name) for name in (
        "PushMessages", "PushObject", "PullObject", "PullMessages", "PullTaskInput", "AcquireTask")],
    "clients.executor": [(None, "pull_input"), (None, "push_message"), (None, "push_task_output")],
}
if os.environ.get("FEDREID_ROUND_TRACE_DETAIL"):  # the steps inside a push or a pull, for a closer look
    HOOKED.update({
        "flwr.supercore.inflatable.inflatable_utils": [(None, "push_objects"), (None, "pull_objects"),
                                                       (None, "inflate_object_from_contents")],
        "flwr.supercore.inflatable.inflatable_object": [(None, "get_all_nested_objects"), (None, "get_object_tree")],
        "flwr.common.serde": [(None, "message_to_proto"), (None, "message_from_proto")],
        "server.rounds": HOOKED["server.rounds"] + [(None, "exchange")],
        "strategies.packing": [(None, "pack_record"), (None, "unpack_record")],
    })
EMPTY_POLLS = ("pull_messages", "_pull_and_store_message")  # recorded only when something came
_lock = threading.Lock()


def _timed(function: Callable[..., Any], label: str, path: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        result = function(*args, **kwargs)
        if label.endswith("pull_messages"):
            result = list(result)
        if not (label.endswith(EMPTY_POLLS) and not result):
            event = {"pid": os.getpid(), "fn": label, "t0": start, "t1": time.time()}
            if hasattr(result, "object_available"):  # an object pull: did it find the object yet?
                event["available"] = bool(result.object_available)
            line = json.dumps(event)
            with _lock, open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        return result

    return timed


class _HookOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, path: str) -> None:
        self.path = path

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in HOOKED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            for owner_name, function in HOOKED[name]:
                owner = getattr(module, owner_name) if owner_name else module
                label = f"{owner_name or name.rsplit('.', 1)[-1]}.{function}"
                setattr(owner, function, _timed(getattr(owner, function), label, self.path))

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(TRACE_VARIABLE):
    sys.meta_path.insert(0, _HookOnImport(os.environ[TRACE_VARIABLE]))
