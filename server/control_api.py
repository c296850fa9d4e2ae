"""The SuperLink's Control API asked from this process, through the flwr CLI's own HTTP client.

`flwr ls`, `flwr supernode list`, `flwr supernode register` and `flwr log --show` each start a new
Python process that spends about two CPU-seconds importing the CLI for an answer the SuperLink gives
in about 10 ms (measured on this 2-core box). A harness that waits on a run, a simulation that
checks how its run ended and `fedreid-certs register` ask often, beside the run itself, so they ask
here instead: the same client Flower's CLI builds (`init_http_client_from_connection`: TLS with the
given CA, its version and account interceptors), made once per SuperLink and kept, and the same
requests. Only `flwr run` (it builds the app's FAB) and `flwr log --stream` stay CLI processes.

fedreid's SuperLinks do not use Flower's account authentication (sites authenticate by their
registered keys), so the client carries Flower's no-op account plugin, whatever a credential store
in the caller's Flower home says. Every Flower name used is in ``FLOWER_CONTROL_API``, checked when
the first client is made.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from server.flower_names import import_flower_names

FLOWER_CONTROL_API = {
    "flwr.cli.typing": ["SuperLinkConnection"],
    "flwr.cli.utils": ["init_http_client_from_connection", "flwr_cli_exc_handler", "SUPERLINK_UNAVAILABLE_MESSAGE"],
    "flwr.cli.auth_plugin.noop_auth_plugin": ["NoOpCliAuthPlugin"],
    "flwr.cli.run_utils": ["format_runs"],
    "flwr.cli.supernode.register": ["try_load_public_key"],
    "flwr.common.serde": ["run_from_proto"],
    "flwr.proto.control_pb2": ["ListRunsRequest", "ListNodesRequest", "RegisterNodeRequest", "StreamLogsRequest"],
}
ALREADY_REGISTERED = "Public key already in use"  # the SuperLink's words for a key it already has

T = TypeVar("T")


class ControlApiError(RuntimeError):
    """The SuperLink refused a request or could not be reached; the message is Flower's CLI's own."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class ControlApi:
    """One SuperLink's Control API at ``address`` (TLS with ``ca``; plain HTTP when ``ca`` is None)."""

    def __init__(self, address: str, ca: Path | None, attempts: int = 4) -> None:
        self.address, self.ca, self.attempts = address, ca, attempts
        self._flower: dict[str, Any] = {}
        self._client: Any = None
        self._lock = threading.Lock()  # one request at a time: the client keeps one connection

    def _connect(self) -> Any:
        if self._client is None:
            self._flower = import_flower_names(FLOWER_CONTROL_API, "server/control_api.py")
            cli = self._flower["flwr.cli.utils"]
            connection = self._flower["flwr.cli.typing"].SuperLinkConnection(
                "fedreid", self.address, root_certificates=None if self.ca is None else str(self.ca.resolve()),
                insecure=self.ca is None)
            plugin = self._flower["flwr.cli.auth_plugin.noop_auth_plugin"].NoOpCliAuthPlugin(self.address)
            with contextlib.redirect_stdout(io.StringIO()):  # its "Using SuperLink: ..." line
                self._client = cli.init_http_client_from_connection(connection, plugin)
        return self._client

    def _ask(self, request: Callable[[Any], T]) -> T:
        """``request(client)``; a SuperLink that cannot be reached at all (still starting, a busy
        machine) is asked again, up to ``attempts`` times, 2, 4, 6 ... s apart."""
        import click

        attempts = self.attempts
        for attempt in range(1, attempts + 1):
            with self._lock:
                client = self._connect()
                try:
                    with self._flower["flwr.cli.utils"].flwr_cli_exc_handler():
                        return request(client)
                except click.ClickException as error:
                    unreachable = error.message == self._flower["flwr.cli.utils"].SUPERLINK_UNAVAILABLE_MESSAGE
                    if not unreachable or attempt == attempts:
                        raise ControlApiError(error.message, unreachable) from None
            time.sleep(2.0 * attempt)
        raise AssertionError("unreachable")

    def runs(self, run_id: int | None = None) -> list[dict[str, object]]:
        """The runs (only ``run_id`` when given), oldest first, as `flwr ls --format json` lists
        them: 'run-id', 'status' ('running', 'finished:completed', ...), 'status-details', ...."""
        pb = self._flower_module("flwr.proto.control_pb2")
        reply = self._ask(lambda client: client.ListRuns(pb.ListRunsRequest(run_id=run_id) if run_id is not None
                                                         else pb.ListRunsRequest()))
        runs = [self._flower["flwr.common.serde"].run_from_proto(proto) for proto in reply.run_dict.values()]
        rows = self._flower["flwr.cli.run_utils"].format_runs(runs, reply.now)
        return [{"run-id": str(row.run_id), "fab-id": row.fab_id, "fab-version": row.fab_version,
                 "status": row.status_text, "status-details": row.details, "pending-at": row.pending_at,
                 "running-at": row.running_at, "finished-at": row.finished_at}
                for row in sorted(rows, key=lambda row: row.pending_at)]

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink counts as online now."""
        pb = self._flower_module("flwr.proto.control_pb2")
        reply = self._ask(lambda client: client.ListNodes(pb.ListNodesRequest()))
        return sum(1 for node in reply.nodes_info if node.status == "online")

    def register(self, public_key: Path, name: str) -> str:
        """Register a site's public key under ``name``: 'registered as node N', 'already registered'
        (a rerun, e.g. `docker compose up` again, is harmless) or 'not registered: <why>'."""
        self._connect()
        try:
            key = self._flower["flwr.cli.supernode.register"].try_load_public_key(public_key)
        except Exception as error:  # click's or cryptography's words for a missing or foreign key file
            return f"not registered: {getattr(error, 'message', None) or error}"
        pb = self._flower["flwr.proto.control_pb2"]
        try:
            reply = self._ask(lambda client: client.RegisterNode(pb.RegisterNodeRequest(public_key=key, name=name)))
        except ControlApiError as error:
            return "already registered" if ALREADY_REGISTERED in str(error) else f"not registered: {error}"
        return f"registered as node {reply.node_id}" if reply.node_id else "not registered: no node id came back"

    def log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink holds it now (what `flwr log RUN --show` prints)."""
        pb = self._flower_module("flwr.proto.control_pb2")

        def first_answer(client: Any) -> str:
            for answer in client.StreamLogs(pb.StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                return str(answer.log_output)
            return ""
        return self._ask(first_answer)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _flower_module(self, name: str) -> Any:
        self._connect()
        return self._flower[name]
