"""The ClientApp of a simulated site (and of a deployed site run with ``--run-submitted-app``).

In a simulation, each Ray actor keeps this module imported, and with it one ``Site`` per
partition, for the whole run. A deployed site does not run this app: its site worker
(clients/worker.py) is the SuperNode's executor and runs the installed ``Site`` itself, so that
the submitted app's code never runs beside the images. Only ``fedreid-client --run-submitted-app``
(off by default) has Flower start this module from the submitted app, once per message.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.logs import configure_logging

configure_logging()
app = ClientApp()


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content for a ``kind`` ("train" / "evaluate" / "query") message; ``context.state``
    updated in place. A query asks only for the site's name (the server learns which node is a
    held-out site before it sends any training)."""
    from clients import outgoing, rounds
    from clients.site import site_for  # torch and the model code: imported on first use

    site = site_for(context.run_id, context.node_config, context.run_config)
    if kind == "query":
        return outgoing.name_reply(site.name)
    return rounds.train(site, content, context.state) if kind == "train" else site.evaluate(content, context.state)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=handle("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=handle("evaluate", msg.content, context), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(content=handle("query", msg.content, context), reply_to=msg)
