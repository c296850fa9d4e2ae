"""Echo app: measures what a federated round costs when the clients do no work at all.

Run config ``packed=true`` sends the payload packed into one flat array (strategies/packing.py),
as fedreid does; replies are pulled every 0.1 s, as fedreid's round loop does.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from strategies.packing import pack_record, unpack_record

server = ServerApp()
client = ClientApp()


def payload(values: int) -> ArrayRecord:
    """One array per ResNet-50-like tensor size would be closer, but Flower chunks arrays anyway."""
    rng = np.random.default_rng(0)
    sizes = [values // 160] * 159 + [values - 159 * (values // 160)]
    return ArrayRecord({f"t{i}": Array(rng.standard_normal(n).astype(np.float32)) for i, n in enumerate(sizes)})


@client.train()
def echo(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


def send_and_receive(grid: Grid, messages: list[Message], poll_s: float = 0.1) -> list[Message]:
    """Push, then pull every ``poll_s`` until every message is answered (Flower's own waits 3 s)."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if pending:
            time.sleep(poll_s)
    return replies


@server.main()
def main(grid: Grid, context: Context) -> None:
    arrays = payload(int(context.run_config["values"]))
    sent = pack_record(arrays) if context.run_config.get("packed") else arrays
    nodes: list[int] = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    rounds = []
    for server_round in range(1, int(context.run_config["rounds"]) + 1):
        messages = [Message(content=RecordDict({"arrays": sent}), dst_node_id=node, message_type="train")
                    for node in nodes]
        start = time.perf_counter()
        replies = send_and_receive(grid, messages)
        seconds = time.perf_counter() - start
        ok = all(not r.has_error() and unpack_record(r.content["arrays"])["t0"].numpy()[:4].tolist()
                 == arrays["t0"].numpy()[:4].tolist() for r in replies)
        rounds.append({"round": server_round, "seconds": seconds, "clients": len(replies), "echo_ok": ok})
        print(f"round {server_round}: {seconds:.2f} s, {len(replies)} replies, echo ok {ok}", flush=True)
    if context.run_config["result-file"]:
        with open(str(context.run_config["result-file"]), "w") as handle:
            json.dump({"rounds": rounds, "clients": len(nodes)}, handle)
