"""A private Ray head for one simulation, started beside the SuperLink instead of inside the run.

Left to itself, Flower's simulation process calls ``ray.init()`` once the run has started, so the
3-4 s Ray takes to start on a small machine fall inside the run's first round, after the ServerApp
is already waiting, while one of the machine's cores sits idle during the serial start of the
SuperLink, the app and the simulation process before it. ``fedreid-sim`` therefore starts a Ray
head of its own (``ray start --head --block``) at the same moment as the SuperLink, on free ports
and in a temporary folder of its own, and hands its address to the simulation as ``RAY_ADDRESS``
(the seam Flower 1.39 reads, as for ``--ray-address``). The run then only connects (about 0.5 s).

The head belongs to the run: any number of simulations side by side each have their own; it is
killed with its whole process group once the run ends (nothing in it outlives the run: the
actors' state went back with their replies), and its folder is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from server.flower_cli import console_script, free_port, kill_process_group

READY_LINE = "Ray runtime started"


class PrivateRayError(RuntimeError):
    """The private Ray head did not start; the message names its log."""


class PrivateRay:
    """``ray start --head`` on 127.0.0.1 for one run: ``start()`` returns at once, ``address()``
    waits (bounded) until the head is up, ``stop()`` ends it and removes its folder."""

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
        self.port = free_port()
        self.address_text = f"127.0.0.1:{self.port}"
        # Ray's sockets live under its temporary folder, and AF_UNIX paths stop at 107 bytes: keep it short
        self.folder = Path(tempfile.mkdtemp(prefix="fedreid-ray-", dir="/tmp"))
        self.log_file = self.folder / "ray-start.log"
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False  # the head said it runs (address() returned)

    def command(self) -> list[str]:
        command = [console_script("ray"), "start", "--head", "--block", "--port", str(self.port),
                   "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats",
                   "--temp-dir", str(self.folder), "--ray-client-server-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()),
                   # ports the OS picks for every worker, as ray.init() does: `ray start`'s default range
                   # (10002-19999) is the same for every head, so two runs' workers would collide
                   "--min-worker-port", "0", "--max-worker-port", "0"]
        if self.num_cpus is not None:
            command += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            command += ["--num-gpus", str(self.num_gpus)]
        return command

    def start(self) -> "PrivateRay":
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def address(self, timeout: float = 120.0) -> str:
        """HOST:PORT of the head's GCS once the head says it runs; a clear error, naming the log, when
        it exits first or takes longer than ``timeout``."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log_file.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise PrivateRayError(f"the run's private Ray head exited with code {self.process.returncode} before "
                                      f"it was ready; its log: {self.log_file}\n{self._tail()}")
            if time.monotonic() > deadline:
                raise PrivateRayError(f"the run's private Ray head was not ready after {timeout:.0f} s; its log: "
                                      f"{self.log_file}\n{self._tail()}")
            time.sleep(0.05)
        self.ready = True
        return self.address_text

    def _tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Kill the head's whole process group (GCS, raylet, workers) at once: the run has ended, so
        there is nothing to shut down gracefully, and ``ray start``'s own shutdown takes seconds.
        Its folder is removed, except when the head never became ready: the error named its log."""
        kill_process_group(self.process)
        if self.ready:
            shutil.rmtree(self.folder, ignore_errors=True)
