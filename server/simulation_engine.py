"""Flower's simulation process (``flwr-simulation``) with a prompt hand-over of messages to the sites.

Flower 1.39's Simulation Engine moves the ServerApp's messages to the Ray actors from a thread that
looks for new ones every 0.1 s (``f_stop.wait(0.1)`` in ``vce_api.add_messages_to_queue``), taking
one message per node per look. Each exchange therefore waits 0.05 s on average before any site
starts, and a node with several messages (a held-out site ranked under two protocols, or under
``local`` with every site's model) waits 0.1 s more per message. The simulation's LinkState lives
in this very process, so this entry point wakes that thread whenever a message is stored
(``MessageArrivals``) and otherwise runs Flower's own ``flwr-simulation`` unchanged.

How it is started: the simulation SuperLink (``--isolation subprocess``) launches the process by
its command name, ``flwr-simulation`` (Flower's ``TASK_TYPE_TO_COMMAND``), found on ``PATH``.
``server/simulate.py`` puts a folder holding ``write_launcher``'s ``flwr-simulation`` first on the
SuperLink's ``PATH``; that launcher runs ``main`` here with the arguments the SuperLink gave.

Every Flower name touched here is listed in ``FLOWER_SIMULATION_API`` and checked at start (and by
a test), so a Flower whose engine no longer has that wait is refused instead of silently timed
differently.
"""

from __future__ import annotations

import inspect
import shlex
import stat
import sys
import threading
from logging import INFO
from pathlib import Path
from types import ModuleType
from typing import Any

VCE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
APP_MODULE = "flwr.simulation.app"
CONSTANT_MODULE = "flwr.supercore.constant"
COMMAND = "flwr-simulation"
FLOWER_PICKUP_WAIT = "f_stop.wait(0.1)"  # in add_messages_to_queue
FLOWER_SIMULATION_API = {
    VCE_MODULE: {"add_messages_to_queue": "moves messages from the LinkState to the actors' queue; holds "
                                          "`f_stop.wait(0.1)` between looks",
                 "run_api": "starts add_messages_to_queue as a thread, looked up as a module global"},
    APP_MODULE: {"flwr_simulation": "the `flwr-simulation` console script's function"},
    CONSTANT_MODULE: {"TASK_TYPE_TO_COMMAND": "the command the SuperLink's executor runs per task type",
                      "TaskType": "SIMULATION, the task type of a simulation run"},
}


class MessageArrivals:
    """The engine's stop event as ``add_messages_to_queue`` sees it, woken by new messages: its wait
    between two looks ends as soon as the ServerApp stores a message (or a look found one, since a
    node may hold more than the one message a look takes), and otherwise after Flower's own 0.1 s.
    Setting and reading it are the real stop event's.

    Why not simply look more often: a look reads every stored message for every node, so looking
    ten times as often does ten times that work while nothing has arrived; waking on arrival adds
    none (the simulation process used 19 s of CPU in a 4-round run with Flower's loop and with this)."""

    def __init__(self, state: Any, stop: threading.Event) -> None:
        self.arrived, self._stop = threading.Event(), stop
        store, look = state.store_message_ins, state.get_message_ins

        def store_message_ins(*args: Any, **kwargs: Any) -> Any:
            stored = store(*args, **kwargs)
            self.arrived.set()
            return stored

        def get_message_ins(*args: Any, **kwargs: Any) -> Any:
            found = look(*args, **kwargs)
            if found:
                self.arrived.set()
            return found

        state.store_message_ins, state.get_message_ins = store_message_ins, get_message_ins  # this instance only

    def wait(self, timeout: float | None = None) -> bool:
        if self.arrived.wait(timeout):
            self.arrived.clear()  # the look that follows sees whatever was stored before the wake
        return self._stop.is_set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stop, name)


def check_flower_api() -> ModuleType:
    """The installed Flower's Simulation Engine module, if it has every name and wait relied on here."""
    from server.flower_names import import_flower_names

    modules = import_flower_names(FLOWER_SIMULATION_API, "server/simulation_engine.py")
    constants = modules[CONSTANT_MODULE]
    if constants.TASK_TYPE_TO_COMMAND.get(constants.TaskType.SIMULATION) != COMMAND:
        raise RuntimeError(f"the installed Flower no longer launches simulations as {COMMAND!r}; update "
                           "server/simulation_engine.py")
    engine = modules[VCE_MODULE]
    if FLOWER_PICKUP_WAIT not in inspect.getsource(engine.add_messages_to_queue):
        raise RuntimeError(f"the installed Flower's {VCE_MODULE}.add_messages_to_queue no longer calls "
                           f"{FLOWER_PICKUP_WAIT}; update server/simulation_engine.py")
    return engine


def pick_up_promptly(engine: ModuleType) -> None:
    """Make the engine hand each message to the sites as soon as the ServerApp stores it."""
    flower_pickup = engine.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        from flwr.supercore import log

        log(INFO, "the simulation hands each message to the sites as it is stored (server/simulation_engine.py)")
        flower_pickup(state, queue, nodes_mapping, MessageArrivals(state, f_stop))

    engine.add_messages_to_queue = add_messages_to_queue


def write_launcher(folder: Path) -> Path:
    """``folder/flwr-simulation``: runs ``main`` with this interpreter; put ``folder`` first on the
    simulation SuperLink's PATH. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / COMMAND
    start = "import sys; from server.simulation_engine import main; sys.exit(main())"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(start)} \"$@\"\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def main() -> int | None:
    engine = check_flower_api()
    pick_up_promptly(engine)
    from flwr.simulation.app import flwr_simulation

    sys.argv[0] = COMMAND  # what Flower's own script is called (its exit handling reads it)
    return flwr_simulation()  # type: ignore[func-returns-value]


if __name__ == "__main__":
    sys.exit(main())
