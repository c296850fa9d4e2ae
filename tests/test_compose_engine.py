"""`docker compose up` on a real Docker engine (`make test-compose`; not part of `make test`).

deploy/docker-setup.sh first makes the engine, the Compose plugin and a base image ready (installing
what is missing, and saying so). Then, on one stack, in order: exactly `docker compose up` runs a
short federation to the table; a site's container holds only its own key and reaches only the Fleet
port; a site container killed mid-run is named failed while the run completes; a killed and
restarted SuperLink container resumes its run with every round once; the GPU and monitoring files
pass the real Compose; `docker compose down -v` leaves nothing of the project behind.

Every wait is bounded and polls the state it waits for (container states, metrics.jsonl lines).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent
PROJECT = "fedreid-compose-test"
SITES = ("mall", "station", "campus")
RUN_OVERRIDES = "federation.round_timeout_s=45 federation.report_every_s=10"


class Stack:
    """One compose project of this repository's docker-compose.yml, driven through the docker CLI."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.up: subprocess.Popen[bytes] | None = None

    def compose(self, *args: str, timeout: float = 300, check: bool = True,
                **env: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["docker", "compose", *args], cwd=REPO, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done

    def containers(self) -> dict[str, dict[str, Any]]:
        """service -> its container's `docker compose ps` record (all states)."""
        out = self.compose("ps", "-a", "--format", "json").stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
        return {r["Service"]: r for r in records}

    def wait_exited(self, service: str, timeout: float) -> int:
        """Poll until ``service``'s container has exited; its exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.containers().get(service)
            if record and record["State"] == "exited":
                return int(record["ExitCode"])
            time.sleep(2)
        raise AssertionError(f"{service} did not exit within {timeout:.0f} s; log tail:\n{self.tail()}")

    def wait_state(self, service: str, health: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.containers().get(service, {})
            if record.get("State") == "running" and (not health or record.get("Health") == health):
                return
            time.sleep(1)
        raise AssertionError(f"{service} not running/{health or 'up'} within {timeout:.0f} s")

    def exec_python(self, service: str, code: str) -> str:
        return self.compose("exec", "-T", service, "python", "-c", code, timeout=60).stdout

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def _setup_engine() -> dict[str, str]:
    """Run deploy/docker-setup.sh (prints what it did); its KEY=VALUE lines for compose's environment."""
    done = subprocess.run([str(REPO / "deploy" / "docker-setup.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    print(done.stderr)
    assert done.returncode == 0, f"deploy/docker-setup.sh failed:\n{done.stderr[-3000:]}"
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if re.match(r"^FEDREID_\w+=", line))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {**os.environ, **_setup_engine(), "COMPOSE_PROJECT_NAME": PROJECT, "FEDREID_PROFILE": "test",
           "FEDREID_OVERRIDES": f"federation.rounds=2 {RUN_OVERRIDES}", "FEDREID_RESUME": ""}
    env.pop("FEDREID_ACCESS_LOG", None)
    log = tmp_path_factory.mktemp("compose") / "up.log"
    stack = Stack(env, log)
    stack.compose("down", "-v", "--remove-orphans", timeout=120)  # a stack left by an interrupted run
    try:
        yield stack
    finally:
        if stack.up is not None and stack.up.poll() is None:
            stack.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
            stack.up.wait(timeout=60)


def _run_folder(run_id: str) -> Path:
    folders = sorted((REPO / "outputs").glob(f"*-run{run_id}"))
    assert folders, f"no run folder for run {run_id} under {REPO / 'outputs'}"
    return folders[-1]


def _records(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _submitted_run(text: str) -> str:
    found = re.findall(r"run (\d+) submitted", text)
    assert found, f"no 'run N submitted' in the submitter's output:\n{text[-3000:]}"
    return found[-1]


def _run_folders() -> set[Path]:
    return set((REPO / "outputs").glob("*-run*"))


def _wait_round(before: set[Path], round_number: int, timeout: float) -> Path:
    """Poll until a run folder that is not in ``before`` has ``round_number`` in its metrics.jsonl."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in _run_folders() - before:
            if any(r["round"] >= round_number for r in _records(folder)):
                return folder
        time.sleep(1)
    raise AssertionError(f"round {round_number} of a new run did not finish within {timeout:.0f} s")


def _submit(stack: Stack, name: str, **env: str) -> subprocess.Popen[str]:
    """`docker compose run submit` in the background, its container named ``name``."""
    return subprocess.Popen(["docker", "compose", "run", "--rm", "--no-deps", "--name", name, "submit"], cwd=REPO,
                            env={**stack.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_compose_up_runs_the_federation_to_the_table(stack: Stack) -> None:
    started = time.monotonic()
    with open(stack.log, "wb") as log:
        stack.up = subprocess.Popen(["docker", "compose", "up"], cwd=REPO, env=stack.env, stdout=log,
                                    stderr=subprocess.STDOUT)
    code = stack.wait_exited("submit", timeout=1800)
    seconds = time.monotonic() - started
    text = stack.log.read_text(errors="replace")
    assert code == 0, f"submit exited {code}:\n{stack.tail()}"
    folder = _run_folder(_submitted_run(text))
    for name in ("results.md", "report.html", "metrics.jsonl"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    records = _records(folder)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert sorted(record["train"]["sites"]) == sorted(SITES), record["train"]
        assert not record["train"]["failed"] and not record["train"]["rejected"]
    assert sorted(records[-1]["evaluate"]["sites"]) == sorted(SITES)
    table = (folder / "results.md").read_text()
    assert all(f"| {site} |" in table for site in SITES)
    assert "**mean**" in text  # the submitter printed the table into the log a user watches
    # The log is the federation's: no per-request access lines from the SuperLink's HTTP API.
    assert "pull-messages" not in text and "uvicorn.access" not in text
    assert "round 2/2 trained" in text
    assert stack.up.poll() is None, "plain `up` keeps serving after the run (ended by `down`)"
    print(f"\n`docker compose up` (build included) to submit's exit: {seconds:.0f} s; "
          f"{len(text.splitlines())} log lines")


def test_a_site_container_holds_only_its_key_and_reaches_only_the_fleet_port(stack: Stack) -> None:
    listing = stack.exec_python("site-mall", "import os; print(sorted(os.path.join(d, f)[len('/certs/'):] "
                                             "for d, _, fs in os.walk('/certs') for f in fs))")
    assert eval(listing) == ["ca.crt", "sites/mall", "sites/mall.pub"]  # noqa: S307 - a list literal we printed
    mounts = json.loads(subprocess.run(["docker", "inspect", stack.containers()["site-mall"]["ID"]],
                                       capture_output=True, text=True, check=True).stdout)[0]["Mounts"]
    volumes = sorted(m["Name"].removeprefix(f"{PROJECT}_") for m in mounts if m["Type"] == "volume")
    assert volumes == ["mall-certs", "mall-data", "mall-state"]  # no other site's, no CA's, no server's
    find_keys = ("import os\n"
                 "found = []\n"
                 "for folder, subfolders, files in os.walk('/'):\n"
                 "    subfolders[:] = [d for d in subfolders\n"
                 "                     if os.path.join(folder, d) not in ('/proc', '/sys', '/dev')]\n"
                 "    found += [os.path.join(folder, f) for f in files if f in ('ca.key', 'server.key', 'campus', "
                 "'station', 'campus.pub', 'station.pub')]\n"
                 "print(found)")
    assert eval(stack.exec_python("site-mall", find_keys)) == []  # noqa: S307 - no other key anywhere
    probe = ("import socket\n"
             "def state(host, port):\n"
             "    try:\n"
             "        socket.create_connection((host, port), timeout=5).close(); return 'open'\n"
             "    except OSError as error: return type(error).__name__\n"
             "print(state('superlink', 9092), state('superlink', 9093), state('superlink-control', 9093))")
    fleet, control, by_alias = stack.exec_python("site-mall", probe).split()
    assert fleet == "open"
    assert control == "ConnectionRefusedError"  # the Control API listens on the control network only
    assert by_alias == "gaierror"  # and its name does not even resolve on the fleet network
    control_from_submitter = stack.compose("run", "--rm", "--no-deps", "--entrypoint", "python", "submit", "-c",
                                           "import socket; socket.create_connection(('superlink-control', 9093), "
                                           "timeout=5).close(); print('open')", timeout=120).stdout
    assert control_from_submitter.strip().endswith("open")


def test_a_killed_site_is_named_failed_and_the_run_completes(stack: Stack) -> None:
    before = _run_folders()
    submit = _submit(stack, f"{PROJECT}-submit-kill-site", FEDREID_OVERRIDES=f"federation.rounds=3 {RUN_OVERRIDES}")
    folder = _wait_round(before, 1, timeout=300)
    subprocess.run(["docker", "kill", stack.containers()["site-campus"]["ID"]], check=True, capture_output=True)
    output, _ = submit.communicate(timeout=900)
    assert submit.returncode == 0, output[-3000:]
    records = _records(folder)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert "campus" in records[0]["train"]["sites"]
    after = [r["train"] for r in records[1:]]
    assert all("campus" not in t["sites"] and sorted(t["sites"]) == ["mall", "station"] for t in after), after
    assert any("campus" in t["failed"] for t in after), after
    stack.compose("start", "site-campus", timeout=120)  # back for the next test


def test_a_restarted_superlink_container_resumes_the_run(stack: Stack) -> None:
    overrides = f"federation.rounds=3 {RUN_OVERRIDES}"
    before = _run_folders()
    name = f"{PROJECT}-submit-kill-superlink"
    submit = _submit(stack, name, FEDREID_OVERRIDES=overrides)
    folder = _wait_round(before, 1, timeout=600)
    subprocess.run(["docker", "kill", stack.containers()["superlink"]["ID"]], check=True, capture_output=True)
    subprocess.run(["docker", "kill", name], capture_output=True)  # its log stream is gone with the SuperLink
    submit.communicate(timeout=120)
    stack.compose("start", "superlink", timeout=120)
    stack.wait_state("superlink", "healthy", timeout=180)
    resumed = stack.compose("run", "--rm", "--no-deps", "submit", timeout=1200, FEDREID_RESUME=folder.name,
                            FEDREID_OVERRIDES=overrides)
    assert "completed" in resumed.stdout + resumed.stderr
    rounds = [r["round"] for r in _records(folder)]
    assert rounds == [1, 2, 3], rounds  # every round once, in the same folder


def test_gpu_and_monitoring_files_pass_the_real_compose(stack: Stack) -> None:
    gpu = stack.compose("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config", "--format", "json")
    services = json.loads(gpu.stdout)["services"]
    for site in SITES:
        devices = services[f"site-{site}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    monitoring = json.loads(stack.compose("--profile", "monitoring", "config", "--format", "json").stdout)
    assert monitoring["services"]["prometheus"]["networks"] == {"control": None}
    pulled = subprocess.run(["docker", "pull", "-q", monitoring["services"]["prometheus"]["image"]],
                            capture_output=True, text=True, timeout=120)
    if pulled.returncode != 0:
        print(f"\nprom/prometheus cannot be pulled here ({pulled.stderr.strip()[-200:]}); the monitoring "
              f"profile was checked by `docker compose --profile monitoring config` only, not started")


def test_down_v_leaves_nothing_of_the_project(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans", timeout=300)
    assert stack.up is not None
    assert stack.up.wait(timeout=120) is not None  # `up` returns once the stack is down
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in ("container", "network", "volume"):
        flag = ["-a"] if kind == "container" else []
        left = subprocess.run(["docker", kind, "ls", *flag, "-q", "--filter", label], capture_output=True,
                              text=True, check=True).stdout.split()
        assert left == [], f"{kind}s left by `down -v`: {left}"
