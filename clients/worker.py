"""The site worker: the one long-lived process that runs a deployed site's tasks, with installed code.

    python -m clients.worker --runtime-api 127.0.0.1:9094 --secret-file <state-dir>/superexec.secret \\
        --state-dir <state-dir> --site mall --data-root /data/mall [--gpu 0] [--allow-module M ...] \\
        [--allow-app-hash HASH ...] [site limits, clients/policy.py] [--parent-pid PID]

``fedreid-client`` starts it beside a SuperNode run with ``--isolation process`` and starts it
again when it dies. It is the SuperNode's executor (clients/executor.py): it takes each task from
the SuperNode's Runtime API on this box, refuses any app that is not the fedreid installed here
(clients/trust.py), and runs the installed ``Site`` (clients/site.py) on the message in-process.
No process is started per message, and nothing from the submitted app is ever imported.

It keeps for the whole run what a process per message would rebuild every round: torch and CUDA
initialised, the site's scanned and checked file list, its decoded images, the compiled kernels.
What must survive a restart is not kept here but where it always was: ``context.state`` (pulled
with every task, pushed back updated) and the site's state file on its disk.

Where the site's data and state are, which modules a run may import, and the site's limits come
from this worker's own command line: the ``node_config`` a task carries is replaced by them, so
nothing the Runtime API hands over can point the site elsewhere or turn a check off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message, RecordDict

from clients.answer_on_death import AnswerOnDeath
from clients.app import handle
from clients.executor import RuntimeAddress, TaskLoop, answer_left_over
from clients.location import IMAGES_PER_IDENTITY
from clients.logs import configure_logging
from clients.policy import POLICY_KEY, SitePolicy
from clients.trust import ALLOWED_MODULES_KEY

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


def site_node_config(args: argparse.Namespace, policy: SitePolicy) -> dict[str, object]:
    """The node_config every task runs with: this worker's command line, never the task's."""
    config: dict[str, object] = {"dataset": args.site, "data-root": str(args.data_root.expanduser().resolve()),
                                 "state-dir": str(args.state_dir), ALLOWED_MODULES_KEY: " ".join(args.allow_module),
                                 POLICY_KEY: policy.to_json()}
    if args.gpu is not None:
        config["gpu"] = args.gpu
    if args.images_per_identity is not None:
        config[IMAGES_PER_IDENTITY] = float(args.images_per_identity)
    return config


def message_handler(node_config: dict[str, object]) -> Callable[[Message, Context], RecordDict]:
    """The installed site code's answer to one message (the simulation's ClientApp does the same),
    under this site's own ``node_config``; ``context.state`` is updated in place."""

    def handle_message(message: Message, context: Context) -> RecordDict:
        kind = message.metadata.message_type
        if kind not in MESSAGE_KINDS:
            raise ValueError(f"this site answers {', '.join(MESSAGE_KINDS)} messages, not {kind!r}")
        context.node_config = dict(node_config)  # type: ignore[assignment]
        return handle(kind, message.content, context)

    return handle_message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's Runtime API")
    parser.add_argument("--secret-file", type=Path, required=True, help="the SuperExec secret the SuperNode reads")
    parser.add_argument("--state-dir", type=Path, required=True, help="the site's state folder")
    parser.add_argument("--site", required=True, help="the site's name (in refusals and replies)")
    parser.add_argument("--data-root", type=Path, required=True, help="folder with train/, query/, gallery/")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device index (default: first GPU, else CPU)")
    parser.add_argument("--allow-module", action="append", default=[], metavar="NAME",
                        help="modules a run's model.backbone_factory may name")
    parser.add_argument("--images-per-identity", type=float, default=None, help="FedUReID: this site's own estimate")
    parser.add_argument("--allow-app-hash", action="append", default=[], metavar="HASH",
                        help="accept only apps (FABs) with these sha256 hashes")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (fedreid-client) ends")
    SitePolicy.add_arguments(parser)
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

    apps = AppPolicy(site=args.site, allowed_hashes=frozenset(h.lower() for h in args.allow_app_hash))
    limits = SitePolicy.from_args(args)
    log.info("site worker ready (pid %d, %d CPU threads, imports %.1f s); runs %s; limits %s", os.getpid(),
             torch.get_num_threads(), time.perf_counter() - started, apps.describe(), limits.to_json())
    loop = TaskLoop(runtime, lambda run, fab: apps.refusal(run.fab_id, run.fab_version, fab.hash_str, fab.content),
                    message_handler(site_node_config(args, limits)), args.state_dir,
                    max_task_seconds=limits.max_task_seconds)
    loop.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
