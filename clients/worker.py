"""The site worker: one long-lived process per deployed site that does the ClientApp's work.

    python -m clients.worker --socket <state-dir>/worker.sock --parent-pid <SuperNode pid>

``fedreid-client`` starts it beside the SuperNode. It keeps for the whole run what a fresh
process per message would rebuild every round: torch and CUDA initialised, the site's scanned and
checked file list, its decoded images (host memory or the GPU), the compiled kernels. It serves
one message at a time on a Unix socket (mode 0600) that the thin ClientApp connects to; see
clients/worker_link.py for the protocol.

What must survive a restart is not kept here but where it always was: ``context.state`` (sent
with every message, returned updated) and the site's state file on its disk.

A failing message (an exception in training, say) is answered with the error and the worker
serves the next one; a ClientApp that vanishes mid-message costs only that message. The worker
ends when the SuperNode it belongs to ends (it checks every second).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from clients.logs import configure_logging
from clients.site_state import record_bytes, record_from_bytes
from clients.worker_link import receive_frame, send_frame

if TYPE_CHECKING:  # the handlers import torch: the worker imports them only once its socket listens
    from clients.handlers import Handler

log = logging.getLogger("clients.worker")
PARENT_CHECK_S = 1.0
TRANSFER_TIMEOUT_S = 600.0  # receiving a request or sending a reply; a stuck ClientApp cannot hold the worker


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _watch_parent(pid: int) -> None:
    while _alive(pid):
        time.sleep(PARENT_CHECK_S)
    log.info("the SuperNode (pid %d) has ended; the site worker stops", pid)
    os._exit(0)  # noqa: SLF001 - no cleanup to wait for; the socket file is removed by the next worker


def bind(path: Path) -> socket.socket:
    """Listen on ``path``, owner-only; a stale socket file left by a dead worker is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(umask)
    server.listen(4)
    return server


def handle(connection: socket.socket, handlers: dict[str, Handler]) -> None:
    """Serve one message: run its handler on a Context rebuilt from the request, answer with the
    reply and the updated state, or with the error."""
    connection.settimeout(TRANSFER_TIMEOUT_S)
    header, blobs = receive_frame(connection)
    kind = str(header.get("kind"))
    started = time.perf_counter()
    try:
        if kind not in handlers:
            raise ValueError(f"unknown message kind {kind!r}")
        content, state = record_from_bytes(blobs[0]), record_from_bytes(blobs[1])
        context = Context(run_id=int(header["run_id"]), node_id=int(header["node_id"]),
                          node_config=header["node_config"], state=state, run_config=header["run_config"])
        reply = handlers[kind](content, context)
        answer = {"ok": True, "seconds": time.perf_counter() - started}
        parts = [record_bytes(reply), record_bytes(context.state)]
    except Exception as error:  # noqa: BLE001 - reported to the ClientApp; the worker serves on
        log.error("%s message failed:\n%s", kind, traceback.format_exc())
        answer, parts = {"ok": False, "error": f"{type(error).__name__}: {error}"}, []
    send_frame(connection, answer, parts)
    log.info("%s message handled in %.1f s", kind, time.perf_counter() - started)


def serve(path: Path, parent_pid: int | None) -> None:
    server = bind(path)  # first, so that a ClientApp arriving during the imports below waits in the backlog
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    started = time.perf_counter()
    import torch

    from clients.handlers import HANDLERS  # torchvision, the model code

    log.info("site worker ready on %s (pid %d, %d CPU threads, imports %.1f s)", path, os.getpid(),
             torch.get_num_threads(), time.perf_counter() - started)
    while True:
        connection, _ = server.accept()
        with connection:
            try:
                handle(connection, HANDLERS)
            except (ConnectionError, OSError) as error:  # the ClientApp went away mid-message
                log.warning("lost the ClientApp's connection (%s); waiting for the next message", error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to serve on")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) ends")
    args = parser.parse_args(argv)
    configure_logging()
    serve(args.socket, args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
