"""A real deployment on loopback for tests: `fedreid-server`, `fedreid-client` per site, `flwr run`.

Every piece is a separate OS process started through the project's own launchers, talking gRPC
(Fleet) and HTTP (Control) over 127.0.0.1 with TLS and SuperNode authentication unless
``insecure``. Processes are started in their own sessions and killed as groups on ``close``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from server.certs import create, register
from server.flower_cli import console_script, flwr_environment, free_port, stop_process_group, wait_healthy

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "fedreid"


class Deployment:
    """One SuperLink plus any number of site SuperNodes, all local processes."""

    def __init__(self, root: Path, sites: dict[str, Path], insecure: bool = False) -> None:
        self.root = root
        self.sites = sites
        self.insecure = insecure
        self.certs = root / "certs"
        self.fleet_port, self.control_port = free_port(), free_port()
        self.cli_home = root / "cli-home"
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.runtime_ports: dict[str, int] = {}
        if not insecure:
            create(self.certs, ["localhost", "127.0.0.1"], list(sites))
        self.cli_home.mkdir(parents=True, exist_ok=True)
        tls = "insecure = true" if insecure else f'root-certificates = "{self.certs / "ca.crt"}"'
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.control_port}"\n{tls}\n')

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log_file = open(self.root / log_name, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(command, cwd=self.root, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=flwr_environment(None))

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start_server(self, timeout: float = 90.0) -> None:
        command = [sys.executable, "-m", "server.launch", "--host", "127.0.0.1", "--fleet-port", str(self.fleet_port),
                   "--control-port", str(self.control_port), "--state-dir", str(self.root / "superlink-state"),
                   "--certs", str(self.certs)] + (["--insecure"] if self.insecure else [])
        self.server = self._spawn(command, "server.log")
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

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([console_script("flwr"), *args], env=flwr_environment(self.cli_home), text=True,
                              capture_output=True, timeout=timeout, check=False)

    def wait_for_nodes(self, count: int, timeout: float = 90.0) -> None:
        """Until `flwr supernode list` shows `count` online SuperNodes."""
        deadline = time.monotonic() + timeout
        listing = None
        while time.monotonic() < deadline:
            listing = self.flwr("supernode", "list", CONNECTION, "--format", "json")
            text = listing.stdout
            if "{" in text:
                nodes = json.loads(text[text.index("{"):]).get("nodes", [])
                if sum(1 for n in nodes if str(n.get("status", "")).startswith("online")) >= count:
                    return
            time.sleep(1.0)
        raise RuntimeError(f"fewer than {count} SuperNodes online after {timeout:.0f} s: "
                           f"{listing.stdout if listing else ''}{listing.stderr if listing else ''}")

    def submit(self, run_config: str) -> int:
        done = self.flwr("run", str(REPO), CONNECTION, "--run-config", run_config, "--format", "json")
        text = done.stdout
        if "{" not in text:
            raise RuntimeError(f"flwr run failed: {done.stdout}{done.stderr}")
        reply = json.loads(text[text.index("{"):])
        if not reply.get("success"):
            raise RuntimeError(f"flwr run failed: {reply}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        text = done.stdout
        if "{" not in text:
            return f"unknown ({done.stdout}{done.stderr})"
        runs = json.loads(text[text.index("{"):]).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown (no such run)"

    def wait_finished(self, run_id: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = self.status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(2.0)
            status = self.status(run_id)
        return status

    def stop_client(self, site: str) -> None:
        stop_process_group(self.clients.pop(site, None))

    def stop_server(self) -> None:
        stop_process_group(self.server)
        self.server = None

    def close(self) -> None:
        for site in list(self.clients):
            self.stop_client(site)
        self.stop_server()
