"""What one federated round costs over gRPC on loopback when the clients do no work.

    python bench/round_overhead.py [--clients 2] [--rounds 4]

Runs a real deployment on 127.0.0.1 (fedreid-server --insecure, one `flower-supernode` per client)
with a minimal echo app (bench/round_overhead_app): the server sends a ResNet-50-sized SHARED
payload (24.56 M float32 values, 98 MB) to every client, which sends it straight back. In the same
run it times:

- the same round with a 1-value payload (fixed costs: polling, ClientApp process start-up), and
- serialising and deserialising the same messages in one process (Flower's own object encoding,
  then copying the arrays out), i.e. the cost that no transport can avoid.

It prints the effective throughput (bytes moved down and up per second of round time), the ratio
round time / in-process time, and the split into fixed and per-byte costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "round_overhead_app"))
from echo_app import payload  # noqa: E402
from flwr.app import Message, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from server.flower_cli import (  # noqa: E402
    SuperLinkConnection,
    console_script,
    flwr_environment,
    free_port,
    stop_process_group,
    wait_healthy,
)

APP = REPO / "bench" / "round_overhead_app"
RESNET50_SHARED_VALUES = 24_559_872


def in_process_seconds(values: int, clients: int, repeats: int = 3) -> tuple[float, int]:
    """Serialise and re-inflate one round's messages (2 per client) with Flower's own object encoding,
    then copy the arrays out; best of ``repeats``. Returns (seconds, bytes of one message)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as inside a run
    arrays = payload(values)
    best, size = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(2 * clients):  # down to each client and back up
            message = Message(content=RecordDict({"arrays": arrays}), dst_node_id=1, message_type="train")
            blobs = {key: obj.deflate() for key, obj in get_all_nested_objects(message).items()}
            size = sum(len(blob) for blob in blobs.values())
            restored = inflate_object_from_contents(message.object_id, blobs)
            copies = {k: a.numpy().copy() for k, a in restored.content["arrays"].items()}  # type: ignore[attr-defined]
            del copies, restored, blobs
        best = min(best, time.perf_counter() - start)
    return best, size


class LoopbackFederation:
    """An insecure SuperLink and ``clients`` SuperNodes on 127.0.0.1, all separate processes."""

    def __init__(self, root: Path, clients: int, in_memory: bool) -> None:
        self.root, self.clients, self.in_memory = root, clients, in_memory
        self.fleet, self.control = free_port(), free_port()
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, command: list[str], name: str, home: Path) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=flwr_environment(home), cwd=self.root)
        self.processes.append(process)
        return process

    def __enter__(self) -> SuperLinkConnection:
        server = self._spawn([sys.executable, "-m", "server.launch", "--insecure", "--host", "127.0.0.1",
                              "--fleet-port", str(self.fleet), "--control-port", str(self.control),
                              "--state-dir", str(self.root / "superlink")]
                             + (["--in-memory-state"] if self.in_memory else []), "superlink", self.root / "superlink")
        wait_healthy(f"http://127.0.0.1:{self.control}/health", server, 90, "the SuperLink")
        for index in range(self.clients):
            self._spawn([console_script("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.fleet}",
                         "--port", str(free_port())], f"node{index}", self.root / f"node{index}")
        connection = SuperLinkConnection(f"127.0.0.1:{self.control}", self.root / "cli", None)
        connection.wait_for_nodes(self.clients, 90)
        return connection

    def __exit__(self, *_exc: object) -> None:
        for process in self.processes:
            stop_process_group(process)


def rounds_over_grpc(connection: SuperLinkConnection, values: int, rounds: int, result: Path) -> list[dict]:
    run_id = connection.submit(APP, f'rounds={rounds} values={values} result-file="{result}"')
    status = connection.wait_finished(run_id, timeout=1800, poll=1.0)
    if status != "finished:completed":
        raise RuntimeError(f"echo run ended as {status}")
    return json.loads(result.read_text())["rounds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--values", type=int, default=RESNET50_SHARED_VALUES)
    args = parser.parse_args()
    measured: dict[str, tuple[list[dict], list[dict]]] = {}
    for store in ("sqlite", "memory"):  # fedreid-server's default database, then --in-memory-state
        with tempfile.TemporaryDirectory(prefix="fedreid-overhead-") as scratch:
            root = Path(scratch)
            with LoopbackFederation(root, args.clients, in_memory=store == "memory") as connection:
                tiny = rounds_over_grpc(connection, 1, args.rounds, root / "tiny.json")
                full = rounds_over_grpc(connection, args.values, args.rounds, root / "full.json")
        assert all(r["echo_ok"] and r["clients"] == args.clients for r in tiny + full)
        measured[store] = (tiny, full)
    local, message_bytes = in_process_seconds(args.values, args.clients)
    moved = 2 * args.clients * message_bytes
    print(f"payload: {args.values:,} float32 values, {message_bytes / 1e6:.1f} MB per message; "
          f"{args.clients} clients; {args.rounds} rounds per setting, median of rounds 2..{args.rounds}")
    print(f"in-process serialise + re-inflate + copy of the round's {2 * args.clients} messages: {local:.2f} s "
          f"({moved / local / 1e6:.0f} MB/s)")
    for store, (tiny, full) in measured.items():
        # the first round of a run also pays for the ClientApp's first import; report the median of the rest
        tiny_s = statistics.median(r["seconds"] for r in tiny[1:])
        full_s = statistics.median(r["seconds"] for r in full[1:])
        label = "SuperLink database (default)" if store == "sqlite" else "SuperLink --in-memory-state"
        print(f"\n{label}:")
        print(f"  round, full payload:    {full_s:6.2f} s  (all: {[round(r['seconds'], 2) for r in full]})")
        print(f"  round, 1-value payload: {tiny_s:6.2f} s  (all: {[round(r['seconds'], 2) for r in tiny]})")
        print(f"  effective throughput {moved / full_s / 1e6:.0f} MB/s; round / in-process = {full_s / local:.1f}x")
        print(f"  fixed part (polling, ClientApp start-up) {tiny_s:.2f} s = {100 * tiny_s / full_s:.0f}%, "
              f"per-byte part {full_s - tiny_s:.2f} s = {100 * (full_s - tiny_s) / full_s:.0f}%")

if __name__ == "__main__":
    main()
