"""docker-compose.yml and its pieces without a Docker engine (the real `docker compose up` is
tests/test_compose_engine.py, `make test-compose`): the files follow the Compose specification, the
isolation the file promises is in it (networks, one certificate volume per role), and the pieces it
calls work on real files: `fedreid-certs export`, the build's pip settings, the quiet access log.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.config
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from server.certs import CertPaths, create, export

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_FILE = REPO / "docker-compose.gpu.yml"
SITES = ("mall", "station", "campus")
sys.path.insert(0, str(REPO / "deploy"))
from build_pip_config import build_config, pip_settings  # noqa: E402


def _load(path: Path) -> dict[str, Any]:
    """YAML as Compose reads it (anchors and merge keys resolved)."""
    return yaml.safe_load(path.read_text())


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    return {volume.split(":")[0]: volume.split(":")[1] for volume in service.get("volumes", [])}


def test_compose_files_follow_the_compose_specification() -> None:
    spec = _load(COMPOSE_FILE)
    compose = PyCompose.from_json(json.dumps(spec))
    compose.to_spec()  # the pydantic model generated from the official JSON schema
    sites = [f"site-{s}" for s in SITES]
    assert set(compose.service_names()) == {"certs", "superlink", "register", *sites, "submit", "prometheus"}
    services = spec["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    for name, service in services.items():
        if name != "prometheus":
            assert service["image"] == "fedreid:local"
            assert service["build"]["args"]["BASE_IMAGE"] == "${FEDREID_BASE_IMAGE:-python:3.11-slim}"
            assert service["build"]["secrets"] == ["pip_conf", "pip_ca"]
    gpu = _load(GPU_FILE)
    PyCompose.from_json(json.dumps(gpu)).to_spec()
    for site in sites:
        devices = gpu["services"][site]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    broken = copy.deepcopy(spec)
    broken["services"]["submit"]["depends_on"]["site-mall"]["condition"] = "when_ready"
    with pytest.raises(ValueError, match="when_ready"):
        PyCompose.from_json(json.dumps(broken))
    scrape = _load(REPO / "deploy" / "prometheus.yml")
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["superlink:9100"]
    assert "telemetry.prometheus_port=9100" in " ".join(services["submit"]["command"])
    assert 'resume="${FEDREID_RESUME:-}"' in " ".join(services["submit"]["command"])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert dockerfile.count("--mount=type=secret,id=pip_conf") == 2  # both pip steps, no COPY of it
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "outputs", "data", ".git", ".env", ".docker-build"} <= set(ignored)


def test_sites_reach_only_the_fleet_network_and_hold_only_their_own_key() -> None:
    services = _load(COMPOSE_FILE)["services"]
    networks = _load(COMPOSE_FILE)["networks"]
    assert networks["fleet"]["internal"] is True  # no route out of the host from a site's container
    superlink = services["superlink"]
    assert superlink["networks"]["control"]["aliases"] == ["superlink-control"]
    command = superlink["command"]
    assert command[command.index("--control-host") + 1] == "superlink-control"  # Control API on `control` only
    for site in SITES:
        service = services[f"site-{site}"]
        assert service["networks"] == ["fleet"]
        assert _volumes(service) == {f"{site}-certs": "/certs", f"{site}-data": "/data", f"{site}-state": "/state"}
    for name in ("register", "submit"):
        assert services[name]["networks"] == ["control"]
        assert _volumes(services[name])["public-certs"] == "/certs"
    assert _volumes(superlink)["server-certs"] == "/certs"
    holders = [name for name, service in services.items() if "ca" in _volumes(service)]
    assert holders == ["certs"] and services["certs"]["network_mode"] == "none"


def test_export_copies_each_role_its_files_and_nothing_more(tmp_path: Path) -> None:
    root = tmp_path / "ca"
    create(root, ["superlink"], list(SITES))
    every = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert {"ca.key", "server.key", "sites/campus"} <= every
    expected = {"server": {"ca.crt", "server.pem", "server.key"},
                "public": {"ca.crt", *(f"sites/{s}.pub" for s in SITES)},
                "site:mall": {"ca.crt", "sites/mall", "sites/mall.pub"}}
    for role, files in expected.items():
        out = tmp_path / role.replace(":", "-")
        export(root, role, out)
        assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == files
    mall = CertPaths(tmp_path / "site-mall")
    assert stat.S_IMODE(mall.site_key("mall").stat().st_mode) == 0o600
    assert mall.site_key("mall").read_bytes() == CertPaths(root).site_key("mall").read_bytes()
    with pytest.raises(ValueError, match="role 'ca'"):
        export(root, "ca", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="sites/lobby"):
        export(root, "site:lobby", tmp_path / "y")


def test_build_pip_config_keeps_network_settings_and_drops_local_paths() -> None:
    listing = ("global.cert='/etc/ssl/certs/ca-certificates.crt'\nglobal.constraint='/etc/xdg/pip/c.txt'\n"
               "global.extra-index-url='file:///opt/pypi/simple https://mirror.example.org/simple'\n"
               "global.find-links='/opt/wheels'\n:env:.default-timeout='180'\n"
               "global.index-url='https://pypi.org/simple'\n")
    settings = pip_settings(listing)
    assert settings["default-timeout"] == "180" and settings["find-links"] == "/opt/wheels"
    config = build_config(settings, ca_copied=True)
    assert config.splitlines() == ["[global]", "index-url = https://pypi.org/simple",
                                   "extra-index-url = https://mirror.example.org/simple", "default-timeout = 180",
                                   "cert = /run/secrets/pip_ca"]
    assert build_config({}, ca_copied=False) == "[global]\n"


def test_the_superlink_access_log_keeps_failed_requests_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from server import superlink_main

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    monkeypatch.setattr(module, "get_uvicorn_log_config", module.get_uvicorn_log_config)  # restored afterwards
    superlink_main.install_quiet_access_log()
    config = module.get_uvicorn_log_config(logging.INFO)
    assert "failed_only" in config["handlers"]["access"]["filters"]
    keep = superlink_main.FailedRequestsOnly()

    def access(status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("172.18.0.3:5000", "POST", "/v1/runtime/pull-messages", "1.1", status), None)

    assert not keep.filter(access(200)) and keep.filter(access(500)) and keep.filter(access(404))
    logging.config.dictConfig(config)  # Flower's configuration with the filter is valid for logging
    assert os.environ.get(superlink_main.ACCESS_LOG_VARIABLE) != "1"
