"""docker-compose.yml without Docker's engine: validated against the Compose specification, then
every service's command run as a local process in the file's dependency order.

What the local run maps, and nothing else: service host names -> 127.0.0.1; the fixed ports
9092/9093/9100 -> free ports (the test machine may use them); container paths of volumes ->
temporary folders (named volumes) or the repository (bind mounts); /app -> the repository; the
image's ENV (read from the Dockerfile) with its absolute paths given a folder per service; and
`--runtime-port` for each site (containers have separate network namespaces, local processes do
not). `${VAR:-default}` is interpolated as Compose does; the test chooses FEDREID_PROFILE=test and one round.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from server.flower_cli import console_script, free_port, stop_process_group

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_FILE = REPO / "docker-compose.gpu.yml"
SITES = ("site-mall", "site-station", "site-campus")


def _load(path: Path) -> dict[str, Any]:
    """YAML as Compose reads it (anchors and merge keys resolved)."""
    return yaml.safe_load(path.read_text())


def test_compose_files_follow_the_compose_specification() -> None:
    spec = _load(COMPOSE_FILE)
    compose = PyCompose.from_json(json.dumps(spec))
    compose.to_spec()  # the pydantic model generated from the official JSON schema
    assert set(compose.service_names()) == {"certs", "superlink", "register", *SITES, "submit", "prometheus"}
    services = spec["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert all(services[s]["build"] == "." and services[s]["image"] == "fedreid:local"
               for s in services if s != "prometheus")
    gpu = _load(GPU_FILE)
    PyCompose.from_json(json.dumps(gpu)).to_spec()
    for site in SITES:
        devices = gpu["services"][site]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    broken = copy.deepcopy(spec)
    broken["services"]["submit"]["depends_on"]["site-mall"]["condition"] = "when_ready"
    with pytest.raises(ValueError, match="when_ready"):
        PyCompose.from_json(json.dumps(broken))
    scrape = _load(REPO / "deploy" / "prometheus.yml")
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["superlink:9100"]
    assert "telemetry.prometheus_port=9100" in " ".join(services["submit"]["command"])


def _dockerfile_env() -> dict[str, str]:
    """The ENV lines of the Dockerfile (KEY=VALUE pairs, with line continuations)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env


def _interpolate(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), value)


def _order(services: dict[str, Any]) -> list[str]:
    """Services without a profile, dependencies first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dependency in services[name].get("depends_on", {}):
                visit(dependency)
            order.append(name)

    for name in services:
        if not services[name].get("profiles"):
            visit(name)
    return order


class LocalCompose:
    """Runs a compose file's services as local processes (see the module docstring for the mapping)."""

    def __init__(self, spec: dict[str, Any], root: Path, env: dict[str, str]) -> None:
        self.spec, self.root, self.env = spec, root, env
        self.ports = {port: str(free_port()) for port in ("9092", "9093", "9100")}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def mounts(self, name: str) -> list[tuple[str, Path]]:
        mounts = [("/app", REPO)]
        for volume in self.spec["services"][name].get("volumes", []):
            source, target = volume.split(":")[:2]
            if source == "./outputs":
                host = self.root / "outputs"  # keep the repository's own outputs/ out of the test
            elif source.startswith("."):
                host = (REPO / source).resolve()  # a file shipped with the repository
            else:
                host = self.root / "volumes" / source  # a named volume
                host.mkdir(parents=True, exist_ok=True)
            mounts.append((target, host))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def translate(self, name: str, text: str) -> str:
        text = _interpolate(text, self.env)
        for service in self.spec["services"]:
            text = re.sub(rf"\b{re.escape(service)}:(?=\d)", "127.0.0.1:", text)
        for port, local in self.ports.items():
            text = re.sub(rf"(?<![\d.]){port}(?!\d)", local, text)
        for target, host in self.mounts(name):
            text = re.sub(rf"(?<![\w.-]){re.escape(target)}(?=/|\b|$)", str(host), text)
        return text

    def command(self, name: str, command: list[str]) -> list[str]:
        argv = [self.translate(name, str(arg)) for arg in command]
        argv[0] = sys.executable if argv[0] == "python" else console_script(argv[0])
        if name in SITES:
            argv += ["--runtime-port", str(free_port())]
        return argv

    def environment(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in _dockerfile_env().items():
            env[key] = str(self.root / "containers" / name / value.lstrip("/")) if value.startswith("/") else value
        service_env = self.spec["services"][name].get("environment", {})
        env.update({key: self.translate(name, str(value)) for key, value in service_env.items()})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        return env

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(self.command(name, self.spec["services"][name]["command"]), cwd=REPO,
                                   env=self.environment(name), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_healthy(self, name: str, timeout: float) -> None:
        check = self.spec["services"][name]["healthcheck"]["test"]
        assert check[0] == "CMD"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.processes[name].poll() is None, self.log(name)[-3000:]
            if subprocess.run(self.command(name, check[1:]), env=self.environment(name), cwd=REPO,
                              capture_output=True, timeout=30).returncode == 0:
                return
            time.sleep(1.0)
        raise AssertionError(f"{name} never became healthy\n{self.log(name)[-3000:]}")

    def up(self, finish: str, timeout: float) -> int:
        """Start everything in dependency order, honouring each depends_on condition; wait for ``finish``."""
        services = self.spec["services"]
        for name in _order(services):
            for dependency, rule in services[name].get("depends_on", {}).items():
                condition = rule["condition"] if isinstance(rule, dict) else "service_started"
                if condition == "service_completed_successfully":
                    code = self.processes[dependency].wait(timeout=600)
                    assert code == 0, f"{dependency} exited {code}\n{self.log(dependency)[-3000:]}"
                elif condition == "service_healthy":
                    self.wait_healthy(dependency, timeout=120)
            self.start(name)
        return self.processes[finish].wait(timeout=timeout)

    def down(self) -> None:
        for process in self.processes.values():
            stop_process_group(process)


def test_compose_services_run_as_local_processes_and_finish_the_federation(tmp_path: Path) -> None:
    local = LocalCompose(_load(COMPOSE_FILE), tmp_path, {"FEDREID_PROFILE": "test",
                                                        "FEDREID_OVERRIDES": "federation.rounds=1"})
    try:
        code = local.up(finish="submit", timeout=900)
        logs = "\n".join(f"--- {n}\n{local.log(n)[-2000:]}" for n in local.processes)
        assert code == 0, logs
    finally:
        local.down()

    submitted = local.log("submit")
    assert "Per-site results after round 1" in submitted, submitted[-3000:]
    for site in ("mall", "station", "campus"):
        assert f"| {site} |" in submitted
        assert (tmp_path / "volumes" / f"{site}-data" / "train").is_dir()  # generated on first start
        assert list((tmp_path / "volumes" / f"{site}-state").glob("*.state"))
    assert "registered as node" in local.log("register")
    runs = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").is_file() and (runs[0] / "metrics.prom").is_file()
