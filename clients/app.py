"""The ClientApp a camera site runs: local training (FedPav / FedReID / FedKLPR) and on-site evaluation.

What leaves the site: the SHARED arrays of its model (pruned tensors in the sparse encoding), a
few numbers (image count, loss, timings, model-change measures, Rank-k/mAP) and its name. What
stays: images, the identity classifier, under the FedBN-style policy the BatchNorm running
statistics, and the pruning masks; those live in ``context.state`` between rounds.

Thin on purpose. A deployed site (``node_config`` names a ``worker`` socket, as ``fedreid-client``
sets it) hands every message to its long-lived site worker, so the process Flower starts per
message imports neither torch nor the data code. Without a worker (the Ray simulation, whose
actors keep this module imported for the whole run, or ``fedreid-client --no-worker``) the work
runs here, in clients/handlers.py, imported on first use.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.logs import configure_logging
from clients.worker_link import WORKER_KEY, ask_worker

configure_logging()
app = ClientApp()


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content for a ``kind`` ("train" / "evaluate") message, from the worker or in-process."""
    worker = str(context.node_config.get(WORKER_KEY, "") or "")
    if worker:
        return ask_worker(Path(worker), kind, content, context)
    from clients.handlers import HANDLERS  # torch and the model code: only where the work runs

    return HANDLERS[kind](content, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=handle("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=handle("evaluate", msg.content, context), reply_to=msg)
