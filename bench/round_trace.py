"""Where a deployment's round overhead goes, hop by hop, from wall-clock spans in every process.

    python bench/round_trace.py [--clients 3] [--rounds 5]

The same deployment as bench/round_overhead.py's "now" row (3 TLS sites on 127.0.0.1, the small
model, profile=test), with bench/round_trace_hooks on every process's PYTHONPATH: they time the
ServerApp's push and pull of messages, each SuperNode's receipt of a message, the SuperLink's
receipt of a reply and its object bookkeeping. A round, from one push of the global model to the
next, is cut into consecutive parts, medians over rounds 2..R:

- push: the ServerApp hands the model to the SuperLink (every site's copy; the objects are shared);
- sites receive: from the end of the push until the last site holds the model;
- slowest site beyond training: from then until its reply reaches the SuperLink, less the
  slowest site's training seconds (taking the input from the SuperNode, the site's own work,
  handing the reply back; the site that replies last is taken as the slowest);
- reply up and pulled: from the last reply's arrival until the ServerApp holds it;
- server: from then to the next push (screening, aggregation, the next message).

Beside them, per round, summed over processes and not on the critical path as a whole: the SuperLink's
object bookkeeping (``store_object``: push-session records, SQL rows unless server/push_sessions.py
keeps them in memory, and the store) and every object
store's hash check (``put``, also in the SuperNodes). With ``--cpu``, the CPU-seconds each kind of
process spent inside each part (bench/cpu_sampler.py; the site's part is left out, it holds training).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from cpu_sampler import ROLES, CpuSampler  # noqa: E402
from round_overhead import training_rounds  # noqa: E402

from server.simulate import ensure_synthetic_sites  # noqa: E402

HOOKS = REPO / "bench" / "round_trace_hooks"
PARTS = ("push", "sites receive", "slowest site beyond training", "reply up and pulled", "server")


def round_parts(events: list[dict], records: list[dict], last: int,
                cpu: CpuSampler | None = None) -> list[dict[str, float]]:
    """Per training round 2..``last``: the consecutive parts (seconds) and the side sums; with ``cpu``,
    also each role's CPU-seconds inside each part (keys "<part> / <role>")."""
    events = sorted(events, key=lambda e: e["t0"])
    pushes = [e for e in events if e["fn"] == "HttpGrid.push_messages"]
    training = {r["round"]: max(float(s["train-seconds"]) for s in r["train"]["sites"].values())
                for r in records if (r.get("train") or {}).get("sites")}
    rows = []
    for server_round in range(2, last + 1):
        push, following = pushes[server_round - 1], pushes[server_round]
        inside = [e for e in events if push["t0"] <= e["t0"] < following["t0"]]
        received = max(e["t1"] for e in events if e["fn"].endswith("_pull_and_store_message")  # its pull may
                       and push["t0"] <= e["t1"] < following["t0"])  # start before the push (held: server/long_polls.py)
        replied = max(e["t0"] for e in inside if e["fn"] == "FleetServicer.PushMessages")
        pulled = max(e["t1"] for e in inside if e["fn"] == "HttpGrid.pull_messages")
        row = {"push": push["t1"] - push["t0"], "sites receive": received - push["t1"],
               "slowest site beyond training": replied - received - training[server_round],
               "reply up and pulled": pulled - replied, "server": following["t0"] - pulled,
               "training": training[server_round], "round": following["t0"] - push["t0"]}
        for label in ("store_object", "InMemoryObjectStore.put"):
            row[label] = sum(e["t1"] - e["t0"] for e in inside if e["fn"].endswith(label))
        if cpu is not None:
            spans = {"push": (push["t0"], push["t1"]), "sites receive": (push["t1"], received),
                     "reply up and pulled": (replied, pulled), "server": (pulled, following["t0"])}
            for part, (start, end) in spans.items():
                spent = cpu.spent(start, end)
                row.update({f"{part} / {role}": spent.get(role, 0.0) for role in dict(ROLES).values()})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="medians over rounds 2..R")
    parser.add_argument("--sites-root", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--overrides", default="", help='extra Hydra overrides, e.g. "transport.dtype=float16"')
    parser.add_argument("--save-trace", type=Path, help="also keep every process's timed spans (JSON lines) here")
    parser.add_argument("--cpu", action="store_true", help="also the CPU-seconds each kind of process spends inside "
                                                           "each part (bench/cpu_sampler.py, /proc every 0.05 s)")
    args = parser.parse_args()
    ensure_synthetic_sites(args.sites_root, args.clients, seed=0)
    with tempfile.TemporaryDirectory(prefix="fedreid-trace-") as scratch:
        trace = Path(scratch) / "trace.jsonl"
        os.environ["FEDREID_ROUND_TRACE"] = str(trace)  # the deployment's processes inherit it
        with contextlib.ExitStack() as stack:
            cpu = stack.enter_context(CpuSampler()) if args.cpu else None
            records, _, _ = training_rounds(REPO, args.sites_root, args.clients, args.rounds + 1, "small", None, 1,
                                            python_path=(HOOKS,), overrides=args.overrides)
        events = [json.loads(line) for line in trace.read_text().splitlines()]
        if args.save_trace:
            args.save_trace.write_text(trace.read_text())
    rows = round_parts(events, records, args.rounds, cpu)
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"{args.clients} sites over TLS on loopback, model=small, CPU{', ' + args.overrides if args.overrides else ''}; "
          f"medians of rounds 2..{args.rounds}")
    print("| part | s |\n|---|---:|")
    for part in PARTS:
        print(f"| {part} | {median[part]:.2f} |")
    overhead = sum(median[p] for p in PARTS)
    print(f"| overhead (sum of the parts) | {overhead:.2f} |")
    print(f"| slowest site's training | {median['training']:.2f} |")
    print(f"| round (push to push) | {median['round']:.2f} |")
    print(f"beside them, per round: the SuperLink's object bookkeeping {median['store_object']:.2f} s, "
          f"hash checks in every object store {median['InMemoryObjectStore.put']:.2f} s (summed over processes)")
    if args.cpu:
        roles = list(dict(ROLES).values())
        print("\nCPU-seconds inside each part, by process (medians; 2 cores give at most twice the part's wall time)")
        print("| part | wall s | " + " | ".join(roles) + " |\n|---|" + "---:|" * (len(roles) + 1))
        for part in PARTS:
            if f"{part} / {roles[0]}" in median:
                print(f"| {part} | {median[part]:.2f} | " + " | ".join(f"{median[f'{part} / {r}']:.2f}" for r in roles) + " |")


if __name__ == "__main__":
    main()
