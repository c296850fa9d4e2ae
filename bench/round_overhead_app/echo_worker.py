"""The echo app's site worker: fedreid's executor loop (clients/executor.py) with the echo as its
installed code, so that the echo bench measures the runtime a fedreid site now has (no process per
message) against Flower's own (a ``flwr-clientapp`` per message, running the submitted app).

    python echo_worker.py --runtime-api 127.0.0.1:PORT --secret-file FILE --state-dir DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (clients/)

from flwr.app import Context, Message, RecordDict  # noqa: E402

from clients.executor import RuntimeAddress, TaskLoop  # noqa: E402

ECHO_APP = "fedreid/fedreid-round-overhead"


def echo(message: Message, context: Context) -> RecordDict:
    return RecordDict({"arrays": message.content["arrays"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtime-api", required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runtime = RuntimeAddress(args.runtime_api, args.secret_file.read_bytes())
    TaskLoop(runtime, lambda run, fab: None if run.fab_id == ECHO_APP else f"not the echo app: {run.fab_id}",
             echo, args.state_dir).serve_forever()


if __name__ == "__main__":
    main()
