"""An ASGI app served by uvicorn on 127.0.0.1 for the length of a ``with`` block (tests, benches)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import uvicorn

from server.flower_cli import free_port

START_TIMEOUT_S = 30.0


@contextlib.contextmanager
def serving(app: Any, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Yield the base URL (``http://`` or, with ``tls`` = (key, certificate), ``https://``) of ``app``
    served on a free port; the server is stopped when the block ends."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           ssl_keyfile=str(tls[0]) if tls else None,
                                           ssl_certfile=str(tls[1]) if tls else None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port} within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
