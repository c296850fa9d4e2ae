"""A real deployment on loopback for tests: `fedreid-server`, `fedreid-client` per site, `flwr run`.

Every piece is a separate OS process started through the project's own launchers, talking gRPC
(Fleet) and HTTP (Control) over 127.0.0.1 with TLS and SuperNode authentication unless
``insecure``. Processes are started in their own sessions and killed as groups on ``close``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

from server.certs import create, register
from server.flower_cli import (
    SuperLinkConnection,
    flwr_environment,
    free_port,
    kill_process_group,
    stop_process_group,
    wait_healthy,
)

REPO = Path(__file__).resolve().parent.parent


class Deployment:
    """One SuperLink plus any number of site SuperNodes, all local processes."""

    def __init__(self, root: Path, sites: dict[str, Path], insecure: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.sites = sites
        self.insecure = insecure
        self.env = env or {}  # added to every process's environment
        self.env_filter: Callable[[dict[str, str]], dict[str, str]] = lambda env: env  # a bench's "before" case
        self.certs = root / "certs"
        self.fleet_port, self.control_port = free_port(), free_port()
        self.cli_home = root / "cli-home"
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.runtime_ports: dict[str, int] = {}
        if not insecure:
            create(self.certs, ["localhost", "127.0.0.1"], list(sites))
        self.connection = SuperLinkConnection(f"127.0.0.1:{self.control_port}", self.cli_home,
                                              None if insecure else self.certs / "ca.crt")

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_file = open(self.root / log_name, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(command, cwd=self.root, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env=self.env_filter({**flwr_environment(None), **self.env, **(env or {})}))

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start_server(self, timeout: float = 90.0, env: dict[str, str] | None = None) -> None:
        """The SuperLink (``env`` is added to its environment, which its ServerApps inherit)."""
        command = [sys.executable, "-m", "server.launch", "--host", "127.0.0.1", "--fleet-port", str(self.fleet_port),
                   "--control-port", str(self.control_port), "--state-dir", str(self.root / "superlink-state"),
                   "--certs", str(self.certs)] + (["--insecure"] if self.insecure else [])
        self.server = self._spawn(command, "server.log", env)
        scheme = "http" if self.insecure else "https"
        try:
            wait_healthy(f"{scheme}://127.0.0.1:{self.control_port}/health", self.server, timeout, "the SuperLink")
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{self.log('server.log')[-3000:]}") from None

    def register_sites(self) -> dict[str, str]:
        return register(self.certs, f"127.0.0.1:{self.control_port}")

    def client_command(self, site: str, key: Path | None = None, *extra: str) -> list[str]:
        port = self.runtime_ports.setdefault(site, free_port())
        command = [sys.executable, "-m", "clients.launch", "--server", f"127.0.0.1:{self.fleet_port}",
                   "--dataset", site, "--data-root", str(self.sites[site]), "--runtime-port", str(port),
                   "--state-dir", str(self.root / "site-state" / site), *extra]
        if self.insecure:
            return [*command, "--insecure"]
        return [*command, "--ca", str(self.certs / "ca.crt"), "--key", str(key or self.certs / "sites" / site)]

    def start_client(self, site: str, key: Path | None = None, *extra: str) -> subprocess.Popen[bytes]:
        self.clients[site] = self._spawn(self.client_command(site, key, *extra), f"client-{site}.log")
        return self.clients[site]

    def start_all(self, env: dict[str, str] | None = None) -> None:
        """SuperLink (``env`` added to its environment), the sites' keys registered, one SuperNode per
        site, all of them online."""
        self.start_server(env=env)
        results = self.register_sites()
        assert all(r.startswith(("registered", "already registered")) for r in results.values()), results
        for site in self.sites:
            self.start_client(site)
        self.wait_for_nodes(len(self.sites))

    def wait_for_nodes(self, count: int, timeout: float = 90.0) -> None:
        self.connection.wait_for_nodes(count, timeout)

    def submit(self, run_config: str) -> int:
        return self.connection.submit(REPO, run_config)

    def status(self, run_id: int) -> str:
        return self.connection.status(run_id)

    def wait_finished(self, run_id: int, timeout: float) -> str:
        """The run's final status (or its last one at ``timeout``)."""
        return self.connection.wait_finished(run_id, timeout)

    def stop_client(self, site: str) -> None:
        stop_process_group(self.clients.pop(site, None))

    def stop_server(self) -> None:
        self.connection.close()  # the SuperLink's graceful stop waits for open connections, ours too
        stop_process_group(self.server)
        self.server = None

    def kill_server(self) -> None:
        """The SuperLink dies at once (SIGKILL), as in a crash; its ServerApp follows it."""
        self.connection.close()
        kill_process_group(self.server)
        self.server = None

    def run_log(self, run_id: int) -> str:
        return self.connection.run_log(run_id)

    def close(self) -> None:
        for site in list(self.clients):
            self.stop_client(site)
        self.stop_server()
