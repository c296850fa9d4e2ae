"""Small helpers around Flower's own programs (flower-superlink, flower-supernode, flwr).

Shared by `fedreid-sim`, the deployment launchers and `fedreid-certs` so that every one of them
starts Flower the same way: the environment's own console scripts, no runtime dependency
installation (offline, and `uv sync` would swap torch), and run status read from the SuperLink's
Control API (server/control_api.py) because `flwr run` exits 0 even when a run fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from server.app_source import staged_app
from server.control_api import ControlApi, ControlApiError
from server.progress import RoundProgress


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# Flower's own waits and transfer sizes, set for every Flower process we start (measured in
# bench/round_overhead.py; see the README's "Round overhead"). Flower reads them at import.
FLOWER_POLLING = {
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # SuperExec's pause between asks for a task to launch (default 1 s);
    # fedreid's SuperLink holds each ask until a run is submitted, up to 1 s (server/long_polls.py)
    # bytes per object of a large array: Flower's 5 MiB measured best (98 MB echo, 3 sites, SQLite:
    # 12.4 s per round at 5 MiB, 15.7 s at 32 MiB, 18.6 s at 128 MiB)
    "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": str(5 * 2**20),
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "4",  # objects in flight per message (default 2; 8: no better)
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "4",
}


COLOUR_FORCING = ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS")  # Jupyter kernels and many CI systems set them


def flwr_environment(flwr_home: Path | None = None) -> dict[str, str]:
    """os.environ plus the settings every Flower process of ours runs with. Colour is off: under
    FORCE_COLOR (set by Jupyter kernels) Flower's processes colour the log lines that its files and
    the run's streamed log then carry."""
    env = {key: value for key, value in os.environ.items() if key not in COLOUR_FORCING}
    env["NO_COLOR"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update({
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` (offline, and it swaps torch)
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    return with_flower_tuning(env)


def with_flower_tuning(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus FLOWER_POLLING, where it does not set those variables itself (its value wins)."""
    for key, value in FLOWER_POLLING.items():
        env.setdefault(key, value)
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


def kill_process_group(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the process's group at once, as a crash would (no graceful shutdown), and reap it."""
    if process is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(timeout=30)


class SuperLinkConnection:
    """One SuperLink's Control API, asked from this process (server/control_api.py). Its FLWR_HOME
    gets a config.toml naming the SuperLink, for a person who wants to ask it with the flwr CLI."""

    def __init__(self, address: str, home: Path, ca: Path | None = None, name: str = "fedreid") -> None:
        self.address, self.home, self.ca, self.name = address, home, ca, name
        self.control = ControlApi(address, ca)  # the questions, asked from this process
        home.mkdir(parents=True, exist_ok=True)
        tls = f'root-certificates = "{ca.resolve()}"' if ca is not None else "insecure = true"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                          f'address = "{address}"\n{tls}\n')

    def stream(self, run_id: int) -> None:
        """Show the run's ServerApp log as it comes, with a progress bar over its rounds
        (server/progress.py), until the run has ended (what `flwr log RUN --stream` shows)."""
        with RoundProgress() as progress:
            pending = ""

            def lines(text: str) -> None:
                nonlocal pending
                *whole, pending = (pending + text).split("\n")
                for line in whole:
                    progress.feed(line + "\n")

            self.control.stream_log(run_id, lines)
            if pending:
                progress.feed(pending + "\n")

    def online_nodes(self) -> int:
        try:
            return self.control.online_nodes()
        except ControlApiError:  # no answer yet: none known to be online
            return 0

    def wait_for_nodes(self, count: int, timeout: float, poll: float = 0.5) -> None:
        """Until ``count`` sites are online, asking every ``poll`` seconds (an ask costs the SuperLink
        milliseconds: it is asked from this process, server/control_api.py)."""
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {online} of {count} sites online at {self.address} after {timeout:.0f} s")
            time.sleep(poll)

    def submit(self, app: Path, run_config: str, federation_config: str = "") -> int:
        """Submit the app in folder ``app`` as `flwr run` does, without streaming; the new run's id."""
        with staged_app(app) as lean:  # the same FAB, without walking .venv (server/app_source.py)
            return self.control.start_run(lean, run_config, federation_config)

    def runs(self, run_id: int | None = None) -> list[dict[str, object]]:
        """The runs as `flwr ls --format json` lists them, oldest first (only ``run_id`` when given);
        RuntimeError (ControlApiError) without an answer."""
        return self.control.runs(run_id)

    def status(self, run_id: int) -> str:
        """e.g. 'running' or 'finished:completed' ('unknown ...' when the SuperLink does not answer)."""
        try:
            runs = self.runs(run_id)
        except RuntimeError as error:
            return f"unknown ({error})"
        return str(runs[0]["status"]) if runs else "unknown (no such run)"

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink holds it (what `flwr log --show` prints), or
        why there is none."""
        try:
            return self.control.log(run_id)
        except ControlApiError as error:
            return f"no log of run {run_id}: {error}"

    def register(self, public_key: Path, name: str) -> str:
        """Register a site's key under ``name`` (see ControlApi.register)."""
        return self.control.register(public_key, name)

    def close(self) -> None:
        self.control.close()

    def wait_finished(self, run_id: int, timeout: float, poll: float = 0.5) -> str:
        """The run's final status (or its last one at ``timeout``), asked every ``poll`` seconds."""
        deadline = time.monotonic() + timeout
        while not (status := self.status(run_id)).startswith("finished") and time.monotonic() < deadline:
            time.sleep(poll)
        return status
