"""Simulation on a Ray cluster: `fedreid-sim --ray-address` (the cluster test runs by `make test-ray-cluster`).

The cluster test starts a real two-node cluster on this machine (`ray start --head` and a second
`ray start --address`, one CPU each, their own temporary folder), runs a 2-round simulation through
it, reads from Ray's own actor table (GCS) that the sites' actors ran on both nodes, checks that
every site took part in every round, and stops exactly the processes of that cluster. The other
tests here are quick and run in `make test`: a wrong address fails before anything starts, and a
node without a site's folder names itself and the path.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from clients.location import SiteConfigError, locate_site
from reid.data.federations import generate_sites
from server.flower_cli import console_script, free_port
from server.simulate import SimulationError, SimulationRequest, _site_names, check_ray_address, main

RAY = str(Path(sys.executable).parent / "ray")


def test_a_wrong_ray_address_fails_fast_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(SimulationError, match=rf"no Ray cluster answers at --ray-address 127\.0\.0\.1:{port}"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(SimulationError, match="HOST:PORT"):
        check_ray_address("head-node")
    assert main(["--ray-address", f"127.0.0.1:{port}", "--no-generate", "--profile", "test"]) == 1
    assert f"127.0.0.1:{port}" in caplog.text
    assert time.monotonic() - started < 30


def test_a_node_without_a_site_folder_names_itself_and_the_path(tmp_path: Path) -> None:
    (tmp_path / "0-mall").mkdir()
    run_config = {"sites-root": str(tmp_path), "site-names": "0-mall 1-station"}
    with pytest.raises(SiteConfigError) as error:
        locate_site({"partition-id": 1, "num-partitions": 2}, run_config)
    assert socket.gethostname() in str(error.value) and str(tmp_path) in str(error.value)
    assert "1-station" in str(error.value)
    # fedreid-sim always names the sites, so a node missing one cannot shift the partitions
    request = SimulationRequest(sites=1, sites_root=tmp_path, output_dir=tmp_path)
    assert _site_names(request) == ("0-mall",)


class RayCluster:
    """A head and a second node on this machine; stop() ends exactly their processes."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Every Ray process of this cluster has this folder on its command line; short, because Ray's
        # sockets live under it (AF_UNIX paths stop at 107 bytes).
        self.temp = Path(tempfile.mkdtemp(prefix="fedreid-ray-", dir="/tmp"))

    def start(self) -> None:
        common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--object-store-memory",
                  str(200 * 2**20), "--temp-dir", str(self.temp), "--node-ip-address", "127.0.0.1"]
        for command in ([RAY, "start", "--head", "--port", str(self.port), "--include-dashboard", "false", *common],
                        [RAY, "start", "--address", self.address, *common]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        assert len(self.nodes()) == 2

    def query(self, code: str) -> object:
        """Run ``code`` (which prints one JSON value) as a Ray driver connected to this cluster."""
        script = f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}\n"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def nodes(self, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            alive = self.query("print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
            assert isinstance(alive, list)
            if len(alive) >= 2 or time.monotonic() > deadline:
                return alive
            time.sleep(1)

    def actor_nodes(self, class_name: str) -> dict[str, int]:
        """Node id -> how many actors of ``class_name`` (alive or dead) Ray placed there."""
        code = ("from ray._private.state import actors\n"
                f"rows = [a for a in actors().values() if a['ActorClassName'].endswith({class_name!r})]\n"
                "counts = {}\n"
                "for a in rows: counts[a['Address']['NodeID']] = counts.get(a['Address']['NodeID'], 0) + 1\n"
                "print(json.dumps(counts))")
        counts = self.query(code)
        assert isinstance(counts, dict)
        return counts

    def stop(self) -> None:
        mine = [p for p in psutil.process_iter(["cmdline"]) if str(self.temp) in " ".join(p.info["cmdline"] or [])]
        for process in mine:
            process.terminate()
        _, alive = psutil.wait_procs(mine, timeout=5)
        for process in alive:
            process.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RayCluster]:
    cluster = RayCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.ray_cluster
@pytest.mark.timeout(900)
def test_a_simulation_runs_on_a_two_node_ray_cluster(cluster: RayCluster, tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    generate_sites(sites, 2, seed=0)
    out = tmp_path / "out"
    command = [console_script("fedreid-sim"), "--ray-address", cluster.address, "--sites", "2",
               "--sites-root", str(sites), "--no-generate", "--output-dir", str(out), "--profile", "test",
               "--flwr-home", str(tmp_path / "flwr")]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=800)
    seconds = time.monotonic() - started
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "simulating on the Ray cluster at" in done.stderr
    folder = next(out.glob("*-run*"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    names = sorted(p.name for p in sites.iterdir())
    assert all(sorted(r["train"]["sites"]) == names for r in records)
    assert sorted(records[-1]["evaluate"]["sites"]) == names
    placed = cluster.actor_nodes("ClientAppActor")
    assert set(placed) == set(cluster.nodes()), f"actors per node: {placed}"  # both nodes ran sites
    print(f"\n2 rounds, 2 sites on a 2-node Ray cluster in {seconds:.0f} s; actors per node: {placed}")
