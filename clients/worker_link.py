"""The local channel between the thin ClientApp and the site worker: a Unix socket, never a port.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message, so a ClientApp that did
the work itself would import torch, initialise CUDA, rescan the site's images and rebuild its
caches every round. A deployed site therefore runs one long-lived worker (clients/worker.py,
started by ``fedreid-client``) and the ClientApp only forwards: it sends the message's content and
the site's ``Context`` (node and run config, ``context.state``) over the socket and puts the
worker's reply content and updated state back. This module imports no torch, so the per-message
process starts in well under a second.

Framing: a frame is an 8-byte big-endian length + UTF-8 JSON header, then the header's
``blobs`` count of (8-byte length + bytes) parts; records travel as Flower's own protobuf.

When the worker is not there (it crashed, or was killed), the ClientApp starts it again from the
command ``fedreid-client`` recorded in ``worker.json`` and fails this message with a clear error;
the next message finds the new worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from clients.site_state import record_bytes, record_from_bytes

log = logging.getLogger("clients.worker_link")
WORKER_KEY = "worker"  # node_config: the socket of this site's worker
LAUNCH_FILE = "worker.json"  # in the socket's folder: how to start the worker again
CONNECT_TIMEOUT_S = 30.0
_LENGTH = struct.Struct(">Q")
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux


class WorkerUnavailable(RuntimeError):
    """The site worker could not be reached, or it died while handling the message."""


class WorkerFailed(RuntimeError):
    """The site worker handled the message and raised; the reason is its error."""


def socket_path(state_dir: Path) -> Path:
    """``<state-dir>/worker.sock``, or a private folder under /tmp when that path is too long for a socket."""
    path = state_dir / "worker.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fedreid-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"worker-{digest}.sock"


def _receive_exactly(connection: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    view, received = memoryview(buffer), 0
    while received < count:
        chunk = connection.recv_into(view[received:], count - received)
        if chunk == 0:
            raise ConnectionError(f"the other side closed the channel after {received} of {count} bytes")
        received += chunk
    return bytes(buffer)


def send_frame(connection: socket.socket, header: dict[str, Any], blobs: list[bytes]) -> None:
    """One header and its binary parts; ``header['blobs']`` tells the reader how many follow."""
    head = json.dumps({**header, "blobs": len(blobs)}).encode()
    connection.sendall(_LENGTH.pack(len(head)) + head)
    for blob in blobs:
        connection.sendall(_LENGTH.pack(len(blob)))
        connection.sendall(blob)


def receive_frame(connection: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    header = json.loads(_receive_exactly(connection, _LENGTH.unpack(_receive_exactly(connection, 8))[0]))
    blobs = [_receive_exactly(connection, _LENGTH.unpack(_receive_exactly(connection, 8))[0])
             for _ in range(int(header["blobs"]))]
    return header, blobs


def restart_worker(path: Path) -> str:
    """Start the worker again from the launch file next to its socket; say what was done."""
    launch = path.with_name(LAUNCH_FILE)
    if not launch.is_file():
        return f"no {launch} to restart it from; restart the site with fedreid-client"
    spec = json.loads(launch.read_text())
    path.unlink(missing_ok=True)  # the dead worker's socket: the new one's appears once it listens
    subprocess.Popen(spec["command"], cwd=spec.get("cwd"), env={**os.environ, **spec.get("env", {})})  # noqa: S603
    return "it is being restarted for the next message"


def process_age() -> float:
    """Seconds since this process started (what Flower's per-message process start-up costs)."""
    with open("/proc/self/stat", encoding="ascii") as handle:
        ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as handle:
        uptime = float(handle.read().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def ask_worker(path: Path, kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Have the worker at ``path`` handle one ``kind`` ("train" / "evaluate") message; return the
    reply content and update ``context.state`` in place with what the worker left there."""
    started = time.perf_counter()
    header = {"kind": kind, "run_id": context.run_id, "node_id": context.node_id,
              "node_config": dict(context.node_config), "run_config": dict(context.run_config)}
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(CONNECT_TIMEOUT_S)
    try:
        connection.connect(str(path))
    except OSError as error:
        connection.close()
        raise WorkerUnavailable(f"the site worker at {path} is not running ({error}); {restart_worker(path)}") \
            from None
    with connection:
        connection.settimeout(None)  # training takes as long as it takes; the server bounds the round
        try:
            send_frame(connection, header, [record_bytes(content), record_bytes(context.state)])
            answer, blobs = receive_frame(connection)
        except (ConnectionError, OSError) as error:
            raise WorkerUnavailable(f"the site worker at {path} died while handling this {kind} message "
                                    f"({error}); {restart_worker(path)}") from None
    if not answer.get("ok"):
        raise WorkerFailed(f"the site worker failed: {answer.get('error')}")
    log.info("%s message: %.2f s in the site worker, %.2f s with the hand-over; this process started %.2f s ago",
             kind, float(answer.get("seconds", 0.0)), time.perf_counter() - started, process_age())
    reply, state = record_from_bytes(blobs[0]), record_from_bytes(blobs[1])
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return reply
