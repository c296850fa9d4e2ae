"""Flower's SuperNode, awake when there is work: ``python -m clients.supernode --poll-interval S ...``.

Flower 1.39's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s whenever
a pull finds no message and checks for the ClientApp's reply every 0.5 s. A round's next message
therefore waits up to 3 s after the server has sent it, twice a round (train, then evaluate). This
entry point runs Flower's own ``flower-supernode`` with those two waits changed: they become
``--poll-interval`` (idle pull, less the time the pull itself took: fedreid's SuperLink holds an
empty pull until a message comes, up to 3 s, server/long_polls.py) and a fifth of it (reply
check), bounded below by ``MIN_POLL_S`` so that a large federation does not flood a SuperLink
that answers at once. The SuperNode also stores each object of a message as it arrives
(``store_as_pulled``), and holds its worker's asks for a task and for an object still on its way
until there is one (server/long_polls.py), so the model reaches the worker chunk by chunk.

Two faults that would otherwise take the site out of the federation without a word are handled
here too. A message whose run cannot be taken (its app bundle is not a zip, has invalid TOML or
does not match its hash: Flower raises out of ``_pull_and_store_message``, and its receiving loop
ends while the process stays up) is answered with an error reply and the loop goes on. A loop
that ends anyway ends the process with ``EXIT_LOOP_ENDED``, and fedreid-client starts it again.

Everything from Flower touched here is listed in ``FLOWER_SUPERNODE_API``; ``check_flower_api``
(run at start and by a test) refuses a Flower whose loop no longer has those waits, instead of
silently running with other timing.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import threading
import time
from types import ModuleType
from typing import Any, Callable

from server import long_polls, whole_bodies
from strategies.wire import pull_promptly

LOOP_MODULE = "flwr.supernode.start_client_internal"
CLI_MODULE = "flwr.supernode.cli.flower_supernode"
FLOWER_IDLE_WAIT_S = 3.0  # `time.sleep(3)` in start_client_internal's receive loop
FLOWER_REPLY_CHECK_S = 0.5  # `time.sleep(0.5)` in _push_messages, waiting for the ClientApp's reply
FLOWER_SUPERNODE_API = {
    LOOP_MODULE: {"time": "module global the loop sleeps through",
                  "start_client_internal": "holds `time.sleep(3)` after an empty pull",
                  "_push_messages": "holds `time.sleep(0.5)` while the reply is not ready",
                  "_pull_and_store_message": "pulls one message and its run; raises on a bad app bundle",
                  "_insert_message": "stores a reply for the loop to push",
                  "pull_objects": "pulls a received message's arrays, backing off 1 s (doubling to 10 s) while "
                                  "the SuperLink does not have them yet"},
    CLI_MODULE: {"flower_supernode": "the `flower-supernode` console script's function"},
    "flwr.supernode.main": {"create_app": "builds the Runtime API app the worker talks to (server/whole_bodies.py)"},
}
DEFAULT_POLL_S = 0.25
MIN_POLL_S = 0.05  # 20 idle pulls a second per site at most
EXIT_LOOP_ENDED = 75  # the receiving loop ended: fedreid-client starts the SuperNode again
log = logging.getLogger("clients.supernode")


class PacedTime:
    """The ``time`` module as Flower's loop sees it: its two fixed waits replaced, all else untouched.

    The reply check (Flower's loop waits 0.5 s, then looks again for the worker's reply and for each
    of its objects in turn) ends early when an object is stored meanwhile (``stored``, rung by the
    object store's ``put``: server/long_polls.py), so each chunk of a reply is forwarded as it lands."""

    def __init__(self, idle_s: float, reply_s: float, real: ModuleType = time,
                 stored: long_polls.Bell = long_polls.OBJECTS) -> None:
        self.idle_s, self.reply_s, self._real, self._stored = idle_s, reply_s, real, stored
        self._woke = real.monotonic()
        self._seen = stored.rung

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_WAIT_S:  # the empty pull's own time counts: fedreid's SuperLink holds
            self._real.sleep(max(0.0, self.idle_s - (self._real.monotonic() - self._woke)))  # it up to 3 s
        elif seconds == FLOWER_REPLY_CHECK_S:  # look again at once if something was stored since the last look
            self._stored.wait_past(self._seen, self.reply_s)
        else:
            self._real.sleep(seconds)
        self._woke, self._seen = self._real.monotonic(), self._stored.rung

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def check_flower_api() -> ModuleType:
    """The installed Flower's SuperNode loop, if it still has every name and wait this module relies on."""
    from server.flower_names import import_flower_names

    loop = import_flower_names(FLOWER_SUPERNODE_API, "clients/supernode.py")[LOOP_MODULE]
    for function, wait in (("start_client_internal", "time.sleep(3)"), ("_push_messages", "time.sleep(0.5)")):
        if wait not in inspect.getsource(getattr(loop, function)):
            raise RuntimeError(f"the installed Flower's {LOOP_MODULE}.{function} no longer calls {wait}; "
                               "update clients/supernode.py's FLOWER_SUPERNODE_API")
    return loop


def pace(poll_s: float) -> PacedTime:
    """Install the SuperNode loop's waits for ``poll_s`` (at least ``MIN_POLL_S``); return what was set."""
    if poll_s < MIN_POLL_S:
        raise ValueError(f"--poll-interval {poll_s} is below {MIN_POLL_S} s: each idle site would pull "
                         f"more than {1 / MIN_POLL_S:.0f} times a second")
    loop = check_flower_api()
    paced = PacedTime(idle_s=poll_s, reply_s=max(MIN_POLL_S, poll_s / 5))
    loop.time = paced  # the loop looks `time` up at every call: this is the whole change
    return paced


def pull_arrays_promptly(loop: ModuleType) -> None:
    """Make the loop ask again for a message's arrays after 0.05 s (doubling to 0.5 s), not 1 s.

    The server stores a message before its arrays: a SuperNode that wakes in between gets the
    message, finds its arrays missing and, with Flower's backoff, waits a second or more although
    they arrive a fraction of a second later (1.4-1.7 s to receive a 20 MB model on 3 sites
    here, of which 0.5 s was the transfer)."""
    pull_promptly(loop)


_receiving = threading.local()  # the object store of the message this thread is receiving, if any


def store_as_pulled(loop: ModuleType) -> None:
    """Make the loop store each object of a message the moment it arrives, not all after the last.

    Flower's loop pulls every object of a message (a 20 MB model: four 5 MiB chunks and a few small
    records) and only then puts them in its store, so the site worker, which takes the task as soon
    as the message is announced, waits for the whole transfer before it can start its own. Stored
    as pulled (each checked against its id by the store's ``put``, as before), the worker's pulls
    follow the SuperNode's chunk by chunk; its SuperNode hands each over the moment it is stored
    (server/long_polls.py). The loop's own store step then has nothing left to do."""
    original_receive = loop._pull_and_store_message  # noqa: SLF001 - listed in FLOWER_SUPERNODE_API
    original_pull = loop.pull_objects
    if getattr(original_pull, "fedreid_store_as_pulled", False):
        return

    def pull_and_store_message(**kwargs: Any) -> int | None:
        _receiving.store = kwargs["object_store"]
        try:
            return original_receive(**kwargs)
        finally:
            _receiving.store = None

    def pull_objects(object_ids: Any, pull_object_fn: Callable[[str], bytes], **kwargs: Any) -> dict[str, bytes]:
        store = getattr(_receiving, "store", None)
        if store is None:
            return original_pull(object_ids, pull_object_fn, **kwargs)

        def pull_and_put(object_id: str) -> bytes:
            content = pull_object_fn(object_id)
            store.put(object_id, content)
            return content

        original_pull(object_ids, pull_and_put, **kwargs)
        return {}  # all stored already

    pull_objects.fedreid_store_as_pulled = True  # type: ignore[attr-defined]
    loop._pull_and_store_message = pull_and_store_message  # noqa: SLF001
    loop.pull_objects = pull_objects


def answer_untakeable_messages(loop: ModuleType) -> None:
    """Make the loop answer a message it cannot take (its run's app bundle is broken) with an error
    reply, instead of ending; a failure before any message arrived still ends it (see main)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    original = loop._pull_and_store_message  # noqa: SLF001 - listed in FLOWER_SUPERNODE_API

    def pull_and_store_message(**kwargs: Any) -> int | None:
        received: list[Any] = []
        receive = kwargs["receive"]

        def remembering_receive() -> Any:
            pulled = receive()
            if pulled is not None:
                received.append(pulled[0])
            return pulled

        try:
            return original(**{**kwargs, "receive": remembering_receive})
        except Exception as error:  # noqa: BLE001 - answered below; nothing else of the run is kept
            if not received:
                raise
            message = received[0]
            reason = (f"site refused a {message.metadata.message_type} message of run {message.metadata.run_id}: "
                      f"its app bundle could not be read ({type(error).__name__})")
            log.error("%s: %s", reason, error)
            reply = Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message)
            loop._insert_message(reply, kwargs["state"], kwargs["object_store"])  # noqa: SLF001
            return message.metadata.run_id

    loop._pull_and_store_message = pull_and_store_message  # noqa: SLF001


def split_poll_interval(argv: list[str]) -> tuple[float, list[str]]:
    """``--poll-interval S`` (or ``=S``) taken out of ``argv``; the rest is Flower's own arguments."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # Flower's own flags pass through
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S)
    known, rest = parser.parse_known_args(argv)
    return known.poll_interval, rest


def main(argv: list[str] | None = None) -> None:
    poll, rest = split_poll_interval(sys.argv[1:] if argv is None else argv)
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)  # a site's log file: when, without colour codes
    pace(poll)
    loop = importlib.import_module(LOOP_MODULE)
    pull_arrays_promptly(loop)
    store_as_pulled(loop)
    answer_untakeable_messages(loop)
    whole_bodies.install("flwr.supernode.main")  # the worker's 20 MB reply crosses the HTTP middleware in one piece
    long_polls.install_task_wait()  # the worker's AcquireTask waits for the next message instead of polling
    long_polls.install_object_wait()  # and its pull of an object still on its way waits for it
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = [sys.argv[0], *rest]
    try:
        flower_supernode()
    except Exception:  # noqa: BLE001 - the loop is gone; Flower's other threads would keep the process up
        log.exception("the SuperNode's receiving loop ended")
        sys.stderr.flush()
        os._exit(EXIT_LOOP_ENDED)  # noqa: SLF001 - non-daemon threads (the Runtime API) would keep us alive


if __name__ == "__main__":
    main()
