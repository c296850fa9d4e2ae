"""What one federated round costs beyond the sites' training: the site runtime before and after the
site worker became the SuperNode's executor (issue 22), side by side in one run.

    python bench/round_overhead.py [--clients 3] [--rounds 5] [--gpu 0 --model resnet50] [--skip-echo]
                                   [--repeats 3 --skip-fixed-wait]

1. **Training rounds.** A real TLS deployment on 127.0.0.1 (``fedreid-server``, one
   ``fedreid-client`` per synthetic site, the small model on the CPU unless ``--model``/``--gpu``),
   ``profile=test`` for ``--rounds`` + 1 rounds, once with the previous runtime (commit
   ``--before``, checked out into a temporary git worktree: Flower starts a ``flwr-clientapp`` per
   message, which forwards it to the site worker over a Unix socket) and once with this checkout's
   (the worker takes the tasks from the SuperNode's Runtime API itself). Per round: wall time from
   one metrics line to the next, the slowest site's training seconds, and their difference, the
   overhead; medians over rounds 2..R. For the new runtime the overhead is split with the sites' own
   timings (``message handled in ...: input, work, reply``): the hand-over (pulling the task's input
   and pushing the reply through the Runtime API), our site work beyond training (probe batches,
   state file, encoding), the server's aggregation, and the rest, which is Flower's floor (the
   SuperNode's 3-s idle poll, its 0.5-s reply check, the transfers, the checkpoint). Every
   ``flwr-clientapp`` process started during the rounds is counted. ``--also PRESET`` adds rows of
   this checkout running other presets (``fedpav_compressed``: the same rounds with a quarter of
   the bytes), with each row's megabytes per round both ways.
2. **Echo.** A minimal app (bench/round_overhead_app) whose clients send a ResNet-50-sized SHARED
   payload (24.56 M float32 values, 98 MB, packed) straight back, with the SuperLink's SQLite state:
   a ``flwr-clientapp`` per message running the app (Flower's own runtime, what fedreid sites had)
   against fedreid's executor loop (echo_worker.py); plus the new runtime with the SuperLink in
   memory, a 1-value payload (the fixed cost) and the in-process cost of serialising the messages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "round_overhead_app"))
from echo_app import payload  # noqa: E402
from tests.polling import Polling  # noqa: E402
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
from clients.supernode import DEFAULT_POLL_S  # noqa: E402
from server.simulate import ensure_synthetic_sites  # noqa: E402

APP = REPO / "bench" / "round_overhead_app"
RESNET50_SHARED_VALUES = 24_559_872
BEFORE = "8428a42"  # the last commit whose sites ran a flwr-clientapp per message (forwarding to the worker)
HANDLED = re.compile(r"train message handled in ([0-9.]+) s: input ([0-9.]+) s, work ([0-9.]+) s, reply ([0-9.]+) s")


class ProcessCounter(Polling):
    """Every process whose command line matches ``pattern`` seen while it runs (polled every 0.1 s;
    a ``flwr-clientapp`` lives for seconds)."""

    def __init__(self, pattern: str) -> None:
        super().__init__(0.1)
        self.pattern, self.pids = pattern, set()

    def poll(self) -> None:
        found = subprocess.run(["pgrep", "-f", self.pattern], capture_output=True, text=True, check=False)
        self.pids.update(found.stdout.split())


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """The project at ``ref`` in a temporary git worktree (its processes run with PYTHONPATH there)."""
    with tempfile.TemporaryDirectory(prefix="fedreid-before-") as scratch:
        folder = Path(scratch) / "checkout"
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=REPO, check=True,
                       capture_output=True)
        try:
            yield folder
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=REPO, check=False,
                           capture_output=True)


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
    """An insecure SuperLink and ``clients`` SuperNodes on 127.0.0.1, all separate processes; with
    ``executor``, each SuperNode in process isolation with the echo's site worker beside it."""

    def __init__(self, root: Path, clients: int, server_args: list[str], executor: bool) -> None:
        self.root, self.clients, self.server_args, self.executor = root, clients, server_args, executor
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
                             + self.server_args, "superlink", self.root / "superlink")
        wait_healthy(f"http://127.0.0.1:{self.control}/health", server, 90, "the SuperLink")
        for index in range(self.clients):
            port, home = free_port(), self.root / f"node{index}"
            # the executor runs beside the SuperNode fedreid-client starts (clients/supernode.py: its idle wait
            # and array pulls paced); Flower's own runtime beside Flower's own flower-supernode
            supernode = [sys.executable, "-m", "clients.supernode"] if self.executor else [console_script("flower-supernode")]
            command = [*supernode, "--insecure", "--superlink", f"127.0.0.1:{self.fleet}", "--port", str(port)]
            if self.executor:
                home.mkdir(parents=True, exist_ok=True)
                secret = home / "secret"
                secret.write_bytes(secrets.token_bytes(32))
                command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
                self._spawn([sys.executable, str(APP / "echo_worker.py"), "--runtime-api", f"127.0.0.1:{port}",
                             "--secret-file", str(secret), "--state-dir", str(home)], f"worker{index}", home)
            self._spawn(command, f"node{index}", home)
        self.connection = SuperLinkConnection(f"127.0.0.1:{self.control}", self.root / "cli", None)
        self.connection.wait_for_nodes(self.clients, 90)
        return self.connection

    def __exit__(self, *_exc: object) -> None:
        self.connection.close()  # the SuperLink's graceful stop waits for open connections
        for process in self.processes:
            stop_process_group(process)


def echo_rounds(connection: SuperLinkConnection, values: int, rounds: int, result: Path) -> list[dict]:
    run_id = connection.submit(APP, f'rounds={rounds} values={values} result-file="{result}" packed=true')
    status = connection.wait_finished(run_id, timeout=1800, poll=1.0)
    if status != "finished:completed":
        raise RuntimeError(f"echo run ended as {status}")
    return json.loads(result.read_text())["rounds"]


def training_rounds(code: Path, sites_root: Path, clients: int, rounds: int, model: str, gpu: int | None,
                    cpu_threads: int | None, client_args: tuple[str, ...] = (),
                    algorithm: str = "fedpav", python_path: tuple[Path, ...] = (),
                    overrides: str = "") -> tuple[list[dict], dict[str, str], int]:
    """Per-round records of a real TLS deployment of ``clients`` synthetic sites (profile=test) run
    with the project at ``code`` (``python_path`` ahead of it in every process: bench/round_trace.py's
    hooks) and any extra Hydra ``overrides``; the sites' logs; the flwr-clientapp processes started meanwhile."""
    from tests.deployment import Deployment

    sites = dict([(p.name, p) for p in sorted(sites_root.iterdir()) if p.is_dir()][:clients])
    overrides = f"federation.rounds={rounds} federation.min_sites={clients} model={model} {overrides}".strip()
    extra = ["--gpu", str(gpu)] if gpu is not None else []
    if cpu_threads:
        extra += ["--cpu-threads", str(cpu_threads)]
    extra += list(client_args)
    with tempfile.TemporaryDirectory(prefix="fedreid-overhead-") as scratch:
        root = Path(scratch)
        path = ":".join(str(p) for p in (*python_path, code))
        deployment = Deployment(root, dict(sites), env={"PYTHONPATH": path})
        try:
            deployment.start_server()
            deployment.register_sites()
            for site in sites:
                deployment.start_client(site, None, *extra)
            deployment.wait_for_nodes(len(sites))
            with ProcessCounter("flwr-clientapp") as counter:
                run_id = deployment.connection.submit(code, f'algorithm="{algorithm}" profile="test" '
                                                            f'output-dir="{root / "outputs"}" overrides="{overrides}"')
                status = deployment.wait_finished(run_id, 3600)
            if status != "finished:completed":
                raise RuntimeError(f"training run ended as {status}; logs in {root}")
        finally:
            deployment.close()
        (metrics,) = (root / "outputs").glob("*/metrics.jsonl")
        logs = {site: deployment.log(f"client-{site}.log") for site in sites}
        return [json.loads(line) for line in metrics.read_text().splitlines()], logs, len(counter.pids)


def overhead_table(records: list[dict], logs: dict[str, str], last: int) -> dict[str, float]:
    """Medians over rounds 2..``last``: the round's wall time (from one metrics line to the next:
    sending, training, replies, aggregation, checkpoint), the slowest site's training seconds, their
    difference (the overhead), and, where the sites log their task timings, its parts."""
    elapsed = {r["round"]: float(r["elapsed_s"]) for r in records}
    timings = {site: [tuple(map(float, m.groups())) for m in HANDLED.finditer(text)] for site, text in logs.items()}
    rows: list[dict[str, float]] = []
    for record in records:
        server_round = record["round"]
        if not 2 <= server_round <= last or not (record.get("train") or {}).get("sites"):
            continue
        sites = record["train"]["sites"]
        slowest = max(sites, key=lambda s: float(sites[s]["train-seconds"]))
        training = float(sites[slowest]["train-seconds"])
        moved = record["train"].get("bytes") or {}
        row = {"round": elapsed[server_round] - elapsed[server_round - 1], "training": training,
               "aggregation": float(record["train"].get("aggregation_seconds", 0.0)),
               "megabytes": (moved.get("sent", 0) + moved.get("received", 0)) / 1e6}
        row["overhead"] = row["round"] - training
        if len(timings.get(slowest, [])) >= server_round:  # the site's train task of this round
            _, pulled, work, replied = timings[slowest][server_round - 1]
            row.update({"hand-over": pulled + replied, "site work": work - training})
            row["rest"] = row["overhead"] - row["hand-over"] - row["site work"] - row["aggregation"]
        rows.append(row)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0] if all(key in r for r in rows)}


def print_training_table(args: argparse.Namespace, model: str, gpu: int | None, cpu_threads: int) -> None:
    now_label = f"now: the SuperNode waits --poll-interval {DEFAULT_POLL_S} s when idle"
    fixed_label = "the worker is the SuperNode's executor; Flower's 3 s idle wait"
    measured: dict[str, list[tuple[dict[str, float], int]]] = {}
    with checkout(args.before) as before:
        settings = [(f"before ({args.before}){': a flwr-clientapp per message' if args.before == BEFORE else ''}",
                     before, ())]
        if not args.skip_fixed_wait:
            settings.append((fixed_label, REPO, ("--poll-interval", "3")))
        settings.append((now_label, REPO, ()))
        for repeat in range(args.repeats):  # interleaved: a slow spell of the box falls on every setting alike
            for label, code, client_args in (settings if repeat % 2 == 0 else settings[::-1]):
                # one round more than reported: the last one also evaluates (an exchange of its own)
                records, logs, processes = training_rounds(code, args.sites_root, args.clients, args.rounds + 1,
                                                           model, gpu, cpu_threads, client_args)
                measured.setdefault(label, []).append((overhead_table(records, logs, args.rounds), processes))
    for algorithm in args.also:  # the same runtime with fewer bytes on the wire (a preset's transfer)
        records, logs, processes = training_rounds(REPO, args.sites_root, args.clients, args.rounds + 1, model, gpu,
                                                   cpu_threads, algorithm=algorithm)
        measured[f"now, algorithm={algorithm}"] = [(overhead_table(records, logs, args.rounds), processes)]
    print(f"training rounds: {args.clients} sites over TLS on loopback, model={model}, "
          f"{'GPU ' + str(gpu) if gpu is not None else 'CPU'}; medians of rounds 2..{args.rounds}"
          + (f", then the median of {args.repeats} interleaved runs per setting" if args.repeats > 1 else ""))
    print("| runtime | round s | slowest site's training s | overhead s | MB both ways / round | "
          "flwr-clientapp processes |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {label: {key: statistics.median(row[key] for row, _ in runs) for key in runs[0][0]}
               for label, runs in measured.items()}
    for label, row in medians.items():
        processes = max(p for _, p in measured[label])
        print(f"| {label} | {row['round']:.2f} | {row['training']:.2f} | {row['overhead']:.2f} | "
              f"{row['megabytes']:.1f} | {processes} |")
    now = medians[now_label]
    if "rest" in now:
        print(f"now, the overhead split: hand-over {now['hand-over']:.2f} s, our site work beyond training "
              f"{now['site work']:.2f} s, server aggregation {now['aggregation']:.2f} s, the rest (Flower: SuperNode "
              f"poll and reply check, transfers; the checkpoint) {now['rest']:.2f} s")
    first = next(iter(medians.values()))
    print(f"overhead ratio before / now: {first['overhead'] / now['overhead']:.1f}x", end="")
    if fixed_label in medians:
        print(f"; Flower's 3 s wait / now: {medians[fixed_label]['overhead'] / now['overhead']:.1f}x", end="")
    print(flush=True)
    if args.repeats > 1:  # each run of "now" against the "before" run beside it
        differences = [b["overhead"] - n["overhead"] for (b, _), (n, _) in zip(next(iter(measured.values())),
                                                                             measured[now_label])]
        print(f"overhead before - now, paired by repeat: {', '.join(f'{d:+.2f}' for d in differences)} s; mean "
              f"{statistics.mean(differences):+.2f} +- {statistics.stdev(differences):.2f} s (sd)", flush=True)


def print_echo_table(args: argparse.Namespace) -> None:
    settings = {"before: payloads in SQLite, a flwr-clientapp per message": (["--payloads", "database"], False),
                "payloads in SQLite (Flower's), fedreid's executor": (["--payloads", "database"], True),
                "now: payloads in memory, runs and keys in SQLite (default)": ([], True),
                "--in-memory-state (runs and keys in memory too)": (["--in-memory-state"], True)}
    measured: dict[str, tuple[list[dict], list[dict], int]] = {}
    for label, (server_args, executor) in settings.items():
        with tempfile.TemporaryDirectory(prefix="fedreid-overhead-") as scratch:
            root = Path(scratch)
            with LoopbackFederation(root, args.clients, server_args, executor) as connection, \
                    ProcessCounter("flwr-clientapp") as counter:
                tiny = echo_rounds(connection, 1, args.rounds, root / "tiny.json")
                full = echo_rounds(connection, args.values, args.rounds, root / "full.json")
        assert all(r["echo_ok"] and r["clients"] == args.clients for r in tiny + full)
        measured[label] = (tiny, full, len(counter.pids))
    local, message_bytes = in_process_seconds(args.values, args.clients)
    print(f"\necho: {args.values:,} float32 values, {message_bytes / 1e6:.1f} MB per message, packed; {args.clients} "
          f"clients; median of rounds 2..{args.rounds}; in-process serialise + re-inflate + copy of the round's "
          f"{2 * args.clients} messages: {local:.2f} s")
    print("| runtime | round, 98 MB s | round, 1 value s | MB/s | flwr-clientapp processes |")
    print("|---|---:|---:|---:|---:|")
    moved = 2 * args.clients * message_bytes
    for label, (tiny, full, processes) in measured.items():
        tiny_s = statistics.median(r["seconds"] for r in tiny[1:])
        full_s = statistics.median(r["seconds"] for r in full[1:])
        print(f"| {label} | {full_s:.2f} | {tiny_s:.2f} | {moved / full_s / 1e6:.0f} | {processes} |")


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
    parser.add_argument("--before", default=BEFORE, help="git commit of the runtime to compare with")
    parser.add_argument("--also", nargs="*", default=[], metavar="PRESET",
                        help="extra rows: this checkout's runtime running these presets (e.g. fedpav_compressed)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per setting, interleaved (this box's speed drifts by 20 %% over an hour)")
    parser.add_argument("--skip-fixed-wait", action="store_true",
                        help="leave out the row with Flower's fixed 3 s idle wait")
    parser.add_argument("--skip-echo", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    ensure_synthetic_sites(args.sites_root, args.clients, seed=0)
    if not args.skip_training:
        setups = [(args.model, args.gpu, args.cpu_threads)]
        if args.gpu is None and torch.cuda.is_available():  # and the same with ResNet-50 on the GPU
            setups.append(("resnet50", 0, 0))
        for model, gpu, cpu_threads in setups:
            print_training_table(args, model, gpu, cpu_threads)
    if not args.skip_echo:
        print_echo_table(args)


if __name__ == "__main__":
    main()
