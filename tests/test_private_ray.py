"""The private Ray head a simulation starts beside its SuperLink (server/private_ray.py): real
``ray start`` processes, a real driver connecting, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import psutil
import pytest

from server.private_ray import PrivateRay, PrivateRayError

pytestmark = pytest.mark.ray


def _processes_under(folder: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and folder in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_driver_connects_to_the_private_head_and_stopping_it_leaves_nothing() -> None:
    ray = PrivateRay(num_cpus=1, num_gpus=0).start()
    try:
        address = ray.address(timeout=120)
        assert address == f"127.0.0.1:{ray.port}"
        script = "import json, ray\nray.init(log_to_driver=False)\nprint(json.dumps(ray.cluster_resources()))\n"
        env = {**os.environ, "RAY_ADDRESS": address}  # how Flower's simulation finds it
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["CPU"] == 1
        assert _processes_under(str(ray.folder))  # GCS, raylet, ... run under its own folder
    finally:
        ray.stop()
    assert not _processes_under(str(ray.folder)) and not ray.folder.exists()


def test_a_head_that_cannot_start_is_named_with_its_log() -> None:
    ray = PrivateRay(num_cpus=-1).start()
    try:
        with pytest.raises(PrivateRayError) as error:
            ray.address(timeout=60)
        assert "exited with code" in str(error.value) and str(ray.log_file) in str(error.value)
    finally:
        ray.stop()
    assert ray.log_file.is_file()  # kept: the error names it
    shutil.rmtree(ray.folder)
