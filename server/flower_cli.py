"""Small helpers around Flower's own programs (flower-superlink, flower-supernode, flwr).

Shared by `fedreid-sim`, the deployment launchers and `fedreid-certs` so that every one of them
starts Flower the same way: the environment's own console scripts, no runtime dependency
installation (offline, and `uv sync` would swap torch), and run status read from `flwr ls`
because `flwr run` exits 0 even when a run fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import importlib
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Mapping

from server.app_source import staged_app
from server.progress import RoundProgress


UNREACHABLE = "Connection to the SuperLink is unavailable"  # what the flwr CLI says when it cannot connect


def import_flower_names(api: Mapping[str, Iterable[str]], owner: str) -> dict[str, ModuleType]:
    """The Flower modules named in ``api``, once each has every name listed for it; otherwise a
    RuntimeError naming what is missing and ``owner``, the fedreid module written against them."""
    modules = {name: importlib.import_module(name) for name in api}
    for name, members in api.items():
        missing = [member for member in members if not hasattr(modules[name], member)]
        if missing:
            raise RuntimeError(f"the installed Flower's {name} lacks {missing}; pin flwr==1.39.* or update {owner}")
    return modules


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
    FORCE_COLOR (set by Jupyter kernels) the flwr CLI colours even its `--format json` output."""
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


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def flwr_json(text: str) -> dict[str, object]:
    """The JSON object the flwr CLI prints with --format json (after any log lines)."""
    text = ANSI_ESCAPE.sub("", text)  # in case a colour setting got through after all
    if "{" not in text:
        raise ValueError("no JSON in the output")
    return dict(json.loads(text[text.index("{"):text.rindex("}") + 1]))


class SuperLinkConnection:
    """The flwr CLI pointed at one SuperLink's Control API, from its own FLWR_HOME."""

    def __init__(self, address: str, home: Path, ca: Path | None = None, name: str = "fedreid") -> None:
        self.address, self.home, self.ca, self.name = address, home, ca, name
        home.mkdir(parents=True, exist_ok=True)
        tls = f'root-certificates = "{ca.resolve()}"' if ca is not None else "insecure = true"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                          f'address = "{address}"\n{tls}\n')

    def flwr(self, *args: str, timeout: float | None = 300, stream: bool = False,
             attempts: int = 4) -> subprocess.CompletedProcess[str]:
        """Run `flwr ARGS` (output captured unless ``stream``: then its lines go through a progress bar
        over the rounds; ``timeout`` None = no limit). When the CLI could not reach the SuperLink at
        all (a busy machine, a SuperLink still starting), the same call is tried again, up to
        ``attempts`` times: nothing happened on the SuperLink's side."""
        if stream:
            return self._stream(args, timeout)
        for attempt in range(1, attempts + 1):
            done = subprocess.run([console_script("flwr"), *args], env=flwr_environment(self.home), text=True,
                                  capture_output=True, timeout=timeout, check=False)
            if UNREACHABLE not in done.stdout + done.stderr:
                break
            if attempt < attempts:
                time.sleep(2.0 * attempt)
        return done

    def _stream(self, args: tuple[str, ...], timeout: float | None) -> subprocess.CompletedProcess[str]:
        """`flwr ARGS` with its output shown line by line as it comes (see server/progress.py)."""
        command = [console_script("flwr"), *args]
        with subprocess.Popen(command, env=flwr_environment(self.home), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, bufsize=1) as process, RoundProgress() as progress:
            assert process.stdout is not None
            timer = threading.Timer(timeout, process.kill) if timeout is not None else None
            if timer is not None:
                timer.start()
            try:
                for line in process.stdout:
                    progress.feed(line)
            finally:
                if timer is not None:
                    timer.cancel()
            code = process.wait()
        if timeout is not None and code < 0:
            raise subprocess.TimeoutExpired(command, timeout)
        return subprocess.CompletedProcess(command, code)

    def online_nodes(self) -> int:
        try:
            done = self.flwr("supernode", "list", self.name, "--format", "json", timeout=60)
            nodes = flwr_json(done.stdout).get("nodes", [])
        except (ValueError, subprocess.TimeoutExpired):  # no answer yet: none known to be online
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).startswith("online"))  # type: ignore[union-attr]

    def wait_for_nodes(self, count: int, timeout: float, ready: Callable[[], bool] | None = None,
                       unready_poll: float = 20.0) -> None:
        """Until ``count`` sites are online. Each ask is a `flwr supernode list` process of about two
        CPU-seconds, taken from the SuperNodes still starting on a small machine: with ``ready``, a
        cheap local sign that they are up (checked every 0.2 s), the SuperLink is asked when it turns
        true, and only every ``unready_poll`` seconds before."""
        deadline = time.monotonic() + timeout
        while True:
            if ready is not None and not ready():
                wake = min(time.monotonic() + unready_poll, deadline)
                while time.monotonic() < wake and not ready():
                    time.sleep(0.2)
                time.sleep(0.5)  # the SuperLink records an activation a moment after the site logs it
            if (online := self.online_nodes()) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {online} of {count} sites online at {self.address} after {timeout:.0f} s")
            if ready is None or ready():
                time.sleep(2.0)

    def submit(self, app: Path, run_config: str) -> int:
        """`flwr run` without streaming; the new run's id."""
        with staged_app(app) as lean:  # the same FAB, without walking .venv (server/app_source.py)
            done = self.flwr("run", str(lean), self.name, "--run-config", run_config, "--format", "json")
        try:
            reply = flwr_json(done.stdout)
        except ValueError:
            reply = {}
        if not reply.get("success"):
            raise RuntimeError(f"flwr run failed: {(done.stdout + done.stderr).strip()[-1500:]}")
        return int(reply["run-id"])  # type: ignore[arg-type]

    def runs(self, run_id: int | None = None) -> list[dict[str, object]]:
        """`flwr ls` as run dicts, oldest first (only ``run_id`` when given); RuntimeError without an answer."""
        try:  # a SuperLink busy with many nodes on a loaded machine can be slow to answer: not fatal
            done = self.flwr("ls", self.name, *(["--run-id", str(run_id)] if run_id is not None else []),
                             "--format", "json", timeout=60)
        except subprocess.TimeoutExpired:
            raise RuntimeError("`flwr ls` did not answer within 60 s") from None
        try:
            return list(flwr_json(done.stdout).get("runs", []))  # type: ignore[call-overload]
        except ValueError:
            raise RuntimeError(f"`flwr ls` gave no JSON: {(done.stdout + done.stderr).strip()[-500:]}") from None

    def status(self, run_id: int) -> str:
        """e.g. 'running' or 'finished:completed' ('unknown ...' when the SuperLink does not answer)."""
        try:
            runs = self.runs(run_id)
        except RuntimeError as error:
            return f"unknown ({error})"
        return str(runs[0]["status"]) if runs else "unknown (no such run)"

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink holds it (`flwr log --show`)."""
        done = self.flwr("log", str(run_id), self.name, "--show", timeout=120)
        return done.stdout + done.stderr

    def wait_finished(self, run_id: int, timeout: float, poll: float = 2.0, longest_poll: float = 6.0,
                      ended: Callable[[], bool] | None = None, going: Callable[[], bool] | None = None,
                      going_poll: float = 60.0) -> str:
        """The run's final status (or its last one at ``timeout``). Polls start every ``poll`` seconds and
        stretch to ``longest_poll``: each `flwr ls` is a new process that costs about two CPU-seconds,
        taken from the run itself on a small machine. Two cheap local signs (checked every 0.2 s) change
        when to ask: ``ended`` (the run's ServerApp is gone) has the SuperLink asked at once (half a
        second later: it records the end a moment after); ``going`` (a ServerApp is at work on the run)
        has it asked only every ``going_poll`` seconds meanwhile."""
        deadline = time.monotonic() + timeout
        while not (status := self.status(run_id)).startswith("finished") and time.monotonic() < deadline:
            asked = time.monotonic()
            wake = min(asked + poll, deadline)
            poll = min(poll * 1.5, longest_poll)
            while (left := wake - time.monotonic()) > 0:
                if ended is not None and ended():
                    time.sleep(min(0.5, left))
                    break
                if going is not None and going():
                    wake = min(asked + going_poll, deadline)
                time.sleep(min(0.2 if ended is not None or going is not None else left, left))
        return status
