"""Peak memory of groups of processes, sampled in a background thread (load tests)."""

from __future__ import annotations

import os
import uuid
from typing import Callable

import psutil

from tests.polling import Polling

TAG_VARIABLE = "FEDREID_MEMORY_TAG"
EVERYTHING: dict[str, Callable[[str], bool]] = {"all": lambda _command: True}


def tagged_environment() -> tuple[str, dict[str, str]]:
    """A fresh tag and the environment entry that carries it: every process started with it, and every
    descendant, even one a daemon re-parents to init (Ray's), can be found again by its environment."""
    tag = uuid.uuid4().hex
    return tag, {TAG_VARIABLE: tag}


class PeakMemory(Polling):
    """Every ``interval`` s, the summed PSS (shared pages counted once: what the machine really pays)
    of the processes carrying ``tag``, per group (a predicate on the command line); keeps each peak."""

    def __init__(self, tag: str, groups: dict[str, Callable[[str], bool]], interval: float = 1.0) -> None:
        super().__init__(interval)
        self.tag = tag
        self.groups = groups
        self.peaks = {name: 0 for name in groups}

    def poll(self) -> None:
        totals = dict.fromkeys(self.groups, 0)
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG_VARIABLE) != self.tag:
                    continue
                command = " ".join(process.cmdline())
                pss = process.memory_full_info().pss
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            for name, member in self.groups.items():
                if member(command):
                    totals[name] += pss
        self.peaks = {name: max(self.peaks[name], totals[name]) for name in self.groups}

    def gib(self, group: str) -> float:
        return self.peaks[group] / 2**30
