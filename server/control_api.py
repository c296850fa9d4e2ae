"""The SuperLink's Control API asked from this process, through the flwr CLI's own HTTP client.

`flwr ls`, `flwr supernode list`, `flwr supernode register` and `flwr log --show` each start a new
Python process that spends about two CPU-seconds importing the CLI for an answer the SuperLink gives
in about 10 ms (measured on this 2-core box); `flwr run` and `flwr log --stream` are one more such
process per run. A harness that waits on a run, a simulation that follows its run and
`fedreid-certs register` ask often, beside the run itself, so they ask here instead: the same
client Flower's CLI builds (`init_http_client_from_connection`: TLS with the given CA, its version
and account interceptors), made once per SuperLink and kept, and the same requests, built from the
same Flower functions (`flwr run`: the app's FAB from `build_fab_from_disk`, its run config and
simulation settings parsed as the CLI parses them).

fedreid's SuperLinks do not use Flower's account authentication (sites authenticate by their
registered keys), so the client carries Flower's no-op account plugin, whatever a credential store
in the caller's Flower home says. Every Flower name used is in ``FLOWER_CONTROL_API``, checked when
the first client is made.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from server.flower_names import import_flower_names

FLOWER_CONTROL_API = {
    "flwr.cli.typing": ["SuperLinkConnection"],
    "flwr.cli.utils": ["init_http_client_from_connection", "flwr_cli_exc_handler", "SUPERLINK_UNAVAILABLE_MESSAGE"],
    "flwr.cli.auth_plugin.noop_auth_plugin": ["NoOpCliAuthPlugin"],
    "flwr.cli.build": ["build_fab_from_disk"],
    "flwr.cli.config_utils": ["load_and_validate"],
    "flwr.cli.run_utils": ["format_runs"],
    "flwr.cli.supernode.register": ["try_load_public_key"],
    "flwr.common.config": ["parse_config_args"],
    "flwr.common.serde": ["run_from_proto", "fab_to_proto", "user_config_to_proto"],
    "flwr.supercore.fab": ["Fab"],
    "flwr.supercore.utils": ["simulation_config_from_json"],
    "flwr.proto.control_pb2": ["ListRunsRequest", "ListNodesRequest", "RegisterNodeRequest", "StartRunRequest",
                               "StreamLogsRequest"],
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
        self._lock = threading.Lock()  # the client is made once

    def _connect(self) -> Any:
        """The client, made on the first question (Flower's names checked then)."""
        with self._lock:
            if self._client is None:
                self._flower = import_flower_names(FLOWER_CONTROL_API, "server/control_api.py")
                cli = self._flower["flwr.cli.utils"]
                connection = self._flower["flwr.cli.typing"].SuperLinkConnection(
                    "fedreid", self.address, root_certificates=None if self.ca is None else str(self.ca.resolve()),
                    insecure=self.ca is None)
                plugin = self._flower["flwr.cli.auth_plugin.noop_auth_plugin"].NoOpCliAuthPlugin(self.address)
                logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO: twice a second
                with contextlib.redirect_stdout(io.StringIO()):  # its "Using SuperLink: ..." line
                    self._client = cli.init_http_client_from_connection(connection, plugin)
            return self._client

    def _refused(self, message: str, why: str) -> ControlApiError:
        """``why`` (Flower's CLI's words for a failed request) as an error, marked unreachable when the
        SuperLink could not be reached at all."""
        return ControlApiError(message, why == self._flower["flwr.cli.utils"].SUPERLINK_UNAVAILABLE_MESSAGE)

    def _ask(self, request: Callable[[Any], T]) -> T:
        """``request(client)``; a SuperLink that cannot be reached at all (still starting, a busy
        machine) is asked again, up to ``attempts`` times, 2, 4, 6 ... s apart."""
        import click

        attempts = self.attempts
        for attempt in range(1, attempts + 1):
            client = self._connect()
            try:
                with self._flower["flwr.cli.utils"].flwr_cli_exc_handler():
                    return request(client)
            except click.ClickException as error:
                refused = self._refused(error.message, error.message)
                if not refused.unreachable or attempt == attempts:
                    raise refused from None
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

    def start_run(self, app: Path, run_config: str = "", federation_config: str = "") -> int:
        """Submit the Flower app in folder ``app`` as `flwr run APP --run-config RUN_CONFIG
        --federation-config FEDERATION_CONFIG` does; the new run's id."""
        self._connect()
        flower = self._flower
        try:  # what `flwr run` checks before it builds anything
            flower["flwr.cli.config_utils"].load_and_validate(app / "pyproject.toml")
        except ValueError as error:
            raise ControlApiError(f"{app / 'pyproject.toml'} is not a Flower app: {error}", False) from None
        fab_bytes = flower["flwr.cli.build"].build_fab_from_disk(app)
        fab = flower["flwr.supercore.fab"].Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        serde, parse = flower["flwr.common.serde"], flower["flwr.common.config"].parse_config_args
        simulation = None
        if federation_config:  # `-` in the CLI's keys, `_` in the proto's fields, as the CLI maps them
            settings = {key.replace("-", "_"): value for key, value in parse([federation_config]).items()}
            simulation = flower["flwr.supercore.utils"].simulation_config_from_json(settings)
        request = flower["flwr.proto.control_pb2"].StartRunRequest(
            fab=serde.fab_to_proto(fab), override_config=serde.user_config_to_proto(parse([run_config] if run_config
                                                                                      else None)),
            federation="", override_federation_config=simulation)
        reply = self._ask(lambda client: client.StartRun(request))
        if not reply.HasField("run_id"):
            raise ControlApiError(f"the SuperLink did not start the run{': ' + reply.note if reply.note else ''}",
                                  False)
        return int(reply.run_id)

    def stream_log(self, run_id: int, on_text: Callable[[str], None]) -> None:
        """Hand the run's ServerApp log to ``on_text`` as it comes, until the run has ended and all of
        it is read (what `flwr log RUN --stream` prints). Other questions go on meanwhile (the HTTP
        client is shared between threads). A stream cut off (the SuperLink restarted, a busy machine)
        goes on from the last line read, up to ``attempts`` times."""
        import click

        pb = self._flower_module("flwr.proto.control_pb2")
        after, cut = 0.0, 0
        while True:
            client = self._connect()
            try:
                with self._flower["flwr.cli.utils"].flwr_cli_exc_handler():
                    for answer in client.StreamLogs(pb.StreamLogsRequest(run_id=run_id, after_timestamp=after)):
                        on_text(answer.log_output)
                        after = max(after, answer.latest_timestamp)
                return
            except click.ClickException as error:
                cut += 1
                if cut >= self.attempts:
                    raise self._refused(f"the log of run {run_id} could not be read: {error.message}",
                                        error.message) from None
                time.sleep(2.0 * cut)

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
