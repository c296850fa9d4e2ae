"""Echo app: measures what a federated round costs when the clients do no work at all."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

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


@server.main()
def main(grid: Grid, context: Context) -> None:
    arrays = payload(int(context.run_config["values"]))
    nodes: list[int] = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    rounds = []
    for server_round in range(1, int(context.run_config["rounds"]) + 1):
        messages = [Message(content=RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train")
                    for node in nodes]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages))
        seconds = time.perf_counter() - start
        ok = all(not r.has_error() and r.content["arrays"]["t0"].numpy()[:4].tolist()
                 == arrays["t0"].numpy()[:4].tolist() for r in replies)
        rounds.append({"round": server_round, "seconds": seconds, "clients": len(replies), "echo_ok": ok})
        print(f"round {server_round}: {seconds:.2f} s, {len(replies)} replies, echo ok {ok}", flush=True)
    if context.run_config["result-file"]:
        with open(str(context.run_config["result-file"]), "w") as handle:
            json.dump({"rounds": rounds, "clients": len(nodes)}, handle)
