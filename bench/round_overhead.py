"""What one federated round costs beyond the sites' training, before and after the warm-site work.

    python bench/round_overhead.py [--clients 3] [--rounds 5] [--gpu 0 --model resnet50]

Two parts, all in one run so that the ratios are measured side by side on the same machine:

1. **Training rounds.** A real TLS deployment on 127.0.0.1 (``fedreid-server``, one
   ``fedreid-client`` per synthetic site, the small model on the CPU unless ``--model``/``--gpu``),
   ``profile=test`` for ``--rounds`` rounds, once as before (``--no-worker``, arrays unpacked,
   the server pulling every 0.5 s, Flower's default polls and chunk sizes) and once as now. Per
   round: round seconds, the slowest site's training seconds, and their difference, the overhead;
   medians over rounds 2..R.
2. **Echo.** A minimal app (bench/round_overhead_app) whose clients send a ResNet-50-sized SHARED
   payload (24.56 M float32 values, 98 MB) straight back: unpacked with Flower's defaults, and
   packed with ours, with the SuperLink's SQLite state and in memory; plus a 1-value payload (the
   fixed cost) and the in-process cost of serialising the same messages.
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

import torch


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "round_overhead_app"))
from echo_app import payload  # noqa: E402
from server.simulate import ensure_synthetic_sites  # noqa: E402
from flwr.app import Message, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from server.flower_cli import (  # noqa: E402
    FLOWER_POLLING,
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


FLOWER_DEFAULTS = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE": "5242880",
                   "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "2", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "2"}


def flower_defaults(env: dict[str, str]) -> dict[str, str]:
    """``env`` with Flower's own defaults for the settings we tune (the "before" case)."""
    assert FLOWER_DEFAULTS.keys() == FLOWER_POLLING.keys()
    return {**env, **FLOWER_DEFAULTS}


class LoopbackFederation:
    """An insecure SuperLink and ``clients`` SuperNodes on 127.0.0.1, all separate processes."""

    def __init__(self, root: Path, clients: int, in_memory: bool, tuned: bool) -> None:
        self.root, self.clients, self.in_memory, self.tuned = root, clients, in_memory, tuned
        self.fleet, self.control = free_port(), free_port()
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, command: list[str], name: str, home: Path) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        env = flwr_environment(home) if self.tuned else flower_defaults(flwr_environment(home))
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env, cwd=self.root)
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


def echo_rounds(connection: SuperLinkConnection, values: int, rounds: int, result: Path, packed: bool) -> list[dict]:
    run_id = connection.submit(APP, f'rounds={rounds} values={values} result-file="{result}" '
                                    f'packed={str(packed).lower()}')
    status = connection.wait_finished(run_id, timeout=1800, poll=1.0)
    if status != "finished:completed":
        raise RuntimeError(f"echo run ended as {status}")
    return json.loads(result.read_text())["rounds"]


def training_rounds(sites_root: Path, clients: int, rounds: int, before: bool, model: str,
                    gpu: int | None, cpu_threads: int | None) -> list[dict]:
    """Per-round records of a real TLS deployment of ``clients`` synthetic sites (profile=test)."""
    from tests.deployment import Deployment

    sites = dict([(p.name, p) for p in sorted(sites_root.iterdir()) if p.is_dir()][:clients])
    overrides = f"federation.rounds={rounds} federation.min_sites={clients} model={model}"
    extra = ["--gpu", str(gpu)] if gpu is not None else []
    if cpu_threads:
        extra += ["--cpu-threads", str(cpu_threads)]
    if before:
        overrides += " transport.pack=false federation.poll_interval_s=0.5"
        extra.append("--no-worker")
    with tempfile.TemporaryDirectory(prefix="fedreid-overhead-") as scratch:
        root = Path(scratch)
        deployment = Deployment(root, dict(sites))
        if before:
            deployment.env_filter = flower_defaults
        try:
            deployment.start_server()
            deployment.register_sites()
            for site in sites:
                deployment.start_client(site, None, *extra)
            deployment.wait_for_nodes(len(sites))
            run_id = deployment.submit(f'profile="test" output-dir="{root / "outputs"}" overrides="{overrides}"')
            status = deployment.wait_finished(run_id, timeout=3600)
            if status != "finished:completed":
                raise RuntimeError(f"training run ended as {status}; logs in {root}")
        finally:
            deployment.close()
        (metrics,) = (root / "outputs").glob("*/metrics.jsonl")
        return [json.loads(line) for line in metrics.read_text().splitlines()]


def overhead_table(records: list[dict], last: int) -> dict[str, float]:
    """Medians over rounds 2..``last`` of the round's wall time (from one metrics line to the next:
    sending, training, replies, aggregation, checkpoint), the slowest site's training seconds, and
    their difference, the overhead."""
    elapsed = {r["round"]: float(r["elapsed_s"]) for r in records}
    rows = []
    for record in records:
        server_round = record["round"]
        if not 2 <= server_round <= last or not (record.get("train") or {}).get("sites"):
            continue
        slowest = max(float(m["train-seconds"]) for m in record["train"]["sites"].values())
        rows.append((elapsed[server_round] - elapsed[server_round - 1], slowest))
    return {"round": statistics.median(r for r, _ in rows), "training": statistics.median(t for _, t in rows),
            "overhead": statistics.median(r - t for r, t in rows)}


def print_training_table(args: argparse.Namespace, model: str, gpu: int | None, cpu_threads: int) -> None:
    # one round more than reported: the last one also evaluates (an exchange of its own)
    training = {label: overhead_table(training_rounds(args.sites_root, args.clients, args.rounds + 1,
                                                      label == "before", model, gpu, cpu_threads), args.rounds)
                for label in ("before", "now")}
    print(f"training rounds: {args.clients} sites over TLS on loopback, model={model}, "
          f"{'GPU ' + str(gpu) if gpu is not None else 'CPU'}; medians of rounds 2..{args.rounds}")
    print("| setting | round s | slowest site's training s | overhead s |")
    print("|---|---:|---:|---:|")
    for label, row in training.items():
        print(f"| {label} | {row['round']:.2f} | {row['training']:.2f} | {row['overhead']:.2f} |")
    print(f"overhead ratio before / now: {training['before']['overhead'] / training['now']['overhead']:.1f}x",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per setting (medians over rounds 2..R)")
    parser.add_argument("--values", type=int, default=RESNET50_SHARED_VALUES)
    parser.add_argument("--model", default="small", help="conf/model/<name>.yaml for the training rounds")
    parser.add_argument("--gpu", type=int, default=None,
                        help="CUDA device of every site (default: the CPU, then ResNet-50 on GPU 0 if there is one)")
    parser.add_argument("--sites-root", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="fedreid-client --cpu-threads of every site (they share this machine; 0 = all cores)")
    parser.add_argument("--skip-echo", action="store_true")
    args = parser.parse_args()
    ensure_synthetic_sites(args.sites_root, args.clients, seed=0)
    setups = [(args.model, args.gpu, args.cpu_threads)]
    if args.gpu is None and torch.cuda.is_available():  # and the same with ResNet-50 on the GPU
        setups.append(("resnet50", 0, 0))
    for model, gpu, cpu_threads in setups:
        print_training_table(args, model, gpu, cpu_threads)
    if args.skip_echo:
        return
    settings = {"sqlite, unpacked, Flower defaults (before)": ("sqlite", False),
                "sqlite, packed, tuned (now)": ("sqlite", True),
                "in memory, packed, tuned": ("memory", True)}
    measured: dict[str, tuple[list[dict], list[dict]]] = {}
    for label, (store, now) in settings.items():
        with tempfile.TemporaryDirectory(prefix="fedreid-overhead-") as scratch:
            root = Path(scratch)
            with LoopbackFederation(root, args.clients, in_memory=store == "memory", tuned=now) as connection:
                tiny = echo_rounds(connection, 1, args.rounds, root / "tiny.json", now)
                full = echo_rounds(connection, args.values, args.rounds, root / "full.json", now)
        assert all(r["echo_ok"] and r["clients"] == args.clients for r in tiny + full)
        measured[label] = (tiny, full)
    local, message_bytes = in_process_seconds(args.values, args.clients)
    print(f"\necho: {args.values:,} float32 values, {message_bytes / 1e6:.1f} MB per message; {args.clients} "
          f"clients; median of rounds 2..{args.rounds}; in-process serialise + re-inflate + copy of the round's "
          f"{2 * args.clients} messages: {local:.2f} s")
    print("| setting | round, 98 MB s | round, 1 value s | MB/s |")
    print("|---|---:|---:|---:|")
    moved = 2 * args.clients * message_bytes
    for label, (tiny, full) in measured.items():
        tiny_s = statistics.median(r["seconds"] for r in tiny[1:])
        full_s = statistics.median(r["seconds"] for r in full[1:])
        print(f"| {label} | {full_s:.2f} | {tiny_s:.2f} | {moved / full_s / 1e6:.0f} |")


if __name__ == "__main__":
    main()
