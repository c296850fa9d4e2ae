"""CPU-seconds of a deployment's processes over time, by role, for bench/round_trace.py --cpu.

A thread reads ``/proc/<pid>/stat`` (user + system time) of every process whose command line names
a role in ``ROLES`` every ``interval`` seconds; the new-process scan runs once a second. On a
two-core box the parts of a round are CPU-bound, so which process spends the CPU inside a part says
more than the part's wall time: this is how a `flwr ls` status poll (about two CPU-seconds a
process) was found inside most rounds' push.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import Counter
from pathlib import Path

from tests.polling import Polling

ROLES = (("superlink_main", "SuperLink"), ("flwr-serverapp", "ServerApp"), ("clients.supernode", "SuperNodes"),
         ("clients.worker", "site workers"), ("flwr ", "flwr CLI"), ("superexec", "SuperExec"))  # first match wins
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def role_of(command: str) -> str | None:
    return next((label for key, label in ROLES if key in command), None)


def cpu_seconds(pid: str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime


class CpuSampler(Polling):
    """Samples until the ``with`` block ends; ``spent(t0, t1)`` gives CPU-seconds per role between two wall times."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.times: list[float] = []
        self.samples: list[dict[str, tuple[str, float]]] = []
        self._roles: dict[str, str] = {}
        self._pids: list[str] = []
        self._scanned = 0.0

    def _scan(self) -> list[str]:
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid not in self._roles:
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if (role := role_of(command)) is not None:  # not remembered otherwise: a launcher may exec one
                    self._roles[pid] = role
        return list(self._roles)

    def poll(self) -> None:
        now = time.time()
        if now - self._scanned > 1.0:
            self._pids, self._scanned = self._scan(), now
        row = {}
        for pid in self._pids:
            try:
                row[pid] = (self._roles[pid], cpu_seconds(pid))
            except (OSError, IndexError, ValueError, KeyError):  # it ended: its number may come back as another
                self._roles.pop(pid, None)
        self.times.append(now)
        self.samples.append(row)

    def _at(self, moment: float) -> dict[str, tuple[str, float]]:
        return self.samples[min(bisect.bisect_left(self.times, moment), len(self.samples) - 1)] if self.samples else {}

    def spent(self, start: float, end: float) -> Counter[str]:
        """CPU-seconds per role from ``start`` to ``end`` (processes seen at both ends)."""
        before, after = self._at(start), self._at(end)
        spent: Counter[str] = Counter()
        for pid, (role, seconds) in after.items():
            if pid in before:
                spent[role] += seconds - before[pid][1]
        return spent
