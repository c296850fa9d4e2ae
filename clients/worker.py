"""The site worker: the one long-lived process that runs a deployed site's tasks, with installed code.

    python -m clients.worker --runtime-api 127.0.0.1:9094 --secret-file <state-dir>/superexec.secret \\
        --state-dir <state-dir> --site mall [--allow-app-hash HASH ...] [--parent-pid PID]

``fedreid-client`` starts it beside a SuperNode run with ``--isolation process`` and starts it
again when it dies. It is the SuperNode's executor (clients/executor.py): it takes each task from
the SuperNode's Runtime API on this box, refuses any app that is not the fedreid installed here
(clients/trust.py), and runs the installed ``Site`` (clients/site.py) on the message in-process.
No process is started per message, and nothing from the submitted app is ever imported.

It keeps for the whole run what a process per message would rebuild every round: torch and CUDA
initialised, the site's scanned and checked file list, its decoded images, the compiled kernels.
What must survive a restart is not kept here but where it always was: ``context.state`` (pulled
with every task, pushed back updated) and the site's state file on its disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from clients.answer_on_death import AnswerOnDeath
from clients.app import handle
from clients.executor import RuntimeAddress, TaskLoop, answer_left_over
from clients.logs import configure_logging

log = logging.getLogger("clients.worker")
PARENT_CHECK_S = 1.0
MESSAGE_KINDS = ("train", "evaluate", "query")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _watch_parent(pid: int) -> None:
    while _alive(pid):
        time.sleep(PARENT_CHECK_S)
    log.info("fedreid-client (pid %d) has ended; the site worker stops", pid)
    os._exit(0)  # noqa: SLF001 - nothing to clean up: a task in progress is answered by the next worker


def handle_message(message: Message, context: Context) -> RecordDict:
    """The installed site code's answer to one message (the simulation's ClientApp does the same);
    ``context.state`` is updated in place."""
    kind = message.metadata.message_type
    if kind not in MESSAGE_KINDS:
        raise ValueError(f"this site answers {', '.join(MESSAGE_KINDS)} messages, not {kind!r}")
    return handle(kind, message.content, context)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's Runtime API")
    parser.add_argument("--secret-file", type=Path, required=True, help="the SuperExec secret the SuperNode reads")
    parser.add_argument("--state-dir", type=Path, required=True, help="the site's state folder")
    parser.add_argument("--site", required=True, help="the site's name (in refusals)")
    parser.add_argument("--allow-app-hash", action="append", default=[], metavar="HASH",
                        help="accept only apps (FABs) with these sha256 hashes")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (fedreid-client) ends")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call otherwise
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True, name="parent-watch").start()
    runtime = RuntimeAddress(args.runtime_api, args.secret_file.read_bytes())
    answer_left_over(AnswerOnDeath(args.state_dir), runtime)  # first: the round waits for it
    started = time.perf_counter()
    import torch

    import clients.site  # noqa: F401 - torchvision, the model code: before the first task, not during it
    from clients.trust import AppPolicy

    policy = AppPolicy(site=args.site, allowed_hashes=frozenset(h.lower() for h in args.allow_app_hash))
    log.info("site worker ready (pid %d, %d CPU threads, imports %.1f s); runs %s", os.getpid(),
             torch.get_num_threads(), time.perf_counter() - started, policy.describe())
    loop = TaskLoop(runtime, lambda run, fab: policy.refusal(run.fab_id, run.fab_version, fab.hash_str, fab.content),
                    handle_message, args.state_dir)
    loop.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
