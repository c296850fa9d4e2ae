"""Small helpers around Flower's own programs (flower-superlink, flower-supernode, flwr).

Shared by `fedreid-sim`, the deployment launchers and `fedreid-certs` so that every one of them
starts Flower the same way: the environment's own console scripts, no runtime dependency
installation (offline, and `uv sync` would swap torch), and run status read from `flwr ls`
because `flwr run` exits 0 even when a run fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flwr_environment(flwr_home: Path | None = None) -> dict[str, str]:
    """os.environ plus the settings every Flower process of ours runs with."""
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update({
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` (offline, and it swaps torch)
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    """Wait until `url` answers 200; fail early, naming `what`, if `process` exits first."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # health only, not trust
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not become healthy within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process's group (it must have been started with start_new_session), then SIGKILL."""
    if process is None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def list_runs(connection: str, env: dict[str, str]) -> list[dict[str, object]]:
    """`flwr ls <connection> --format json` as a list of run dicts (oldest first)."""
    listing = subprocess.run([console_script("flwr"), "ls", connection, "--format", "json"], env=env, text=True,
                             capture_output=True, check=False)
    text = listing.stdout
    if "{" not in text:
        raise RuntimeError(f"`flwr ls` gave no JSON: {(listing.stdout + listing.stderr).strip()[-500:]}")
    return list(json.loads(text[text.index("{"):]).get("runs", []))
