"""The SuperLink's load from idle SuperNodes, for each SuperNode poll interval, in one run.

    python bench/superlink_idle_load.py [--sites 20] [--seconds 60] [--polls 3 1 0.25]

A real TLS deployment per interval (fedreid-server, ``--sites`` x ``fedreid-client --poll-interval
S --cpu-threads 1`` on this box, sharing a few synthetic sites' images), no run submitted. Once
every SuperNode is online and its worker ready, it measures for ``--seconds``: the CPU the
SuperLink's process group uses (the SuperLink and its SuperExec), and the bytes on the Fleet API's
connections both ways as the kernel counts them (TLS and gRPC framing included), with the pulls a
second that the interval implies (sites / interval). 3 s is Flower's own fixed idle wait; 0.25 s
is fedreid-client's default. Why: every idle site pulls at that rate for as long as it is
connected, so the interval trades a round's start-up latency against the SuperLink's load.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server.simulate import ensure_synthetic_sites  # noqa: E402
from tests.deployment import Deployment  # noqa: E402


def _group_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (alive now)."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _fleet_bytes(port: int) -> tuple[int, int]:
    """(into, out of) the SuperLink over every established Fleet connection, from ``ss``."""
    listing = subprocess.run(["ss", "-tinH", "state", "established", "src", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, check=True).stdout
    received = sum(int(v) for v in re.findall(r"bytes_received:(\d+)", listing))
    sent = sum(int(v) for v in re.findall(r"bytes_acked:(\d+)", listing))
    return received, sent


def measure(poll: float, sites: dict[str, Path], seconds: float, root: Path) -> dict[str, float]:
    deployment = Deployment(root, sites)
    try:
        deployment.start_server()
        if sites:
            deployment.register_sites()
        for site in sites:
            deployment.start_client(site, None, "--poll-interval", str(poll), "--cpu-threads", "1")
        deployment.wait_for_nodes(len(sites), timeout=900)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and sum(deployment.log(f"client-{s}.log").count("site worker ready")
                                                  for s in sites) < len(sites):
            time.sleep(2)
        time.sleep(10)  # the last imports settle
        assert deployment.server is not None
        cpu0, bytes0, t0 = _group_cpu_seconds(deployment.server.pid), _fleet_bytes(deployment.fleet_port), time.monotonic()
        box0 = psutil.cpu_times()
        time.sleep(seconds)
        cpu1, bytes1, t1 = _group_cpu_seconds(deployment.server.pid), _fleet_bytes(deployment.fleet_port), time.monotonic()
        box1 = psutil.cpu_times()
    finally:
        deployment.close()
    elapsed = t1 - t0
    busy = (box1.user + box1.system) - (box0.user + box0.system)
    return {"poll": poll, "superlink_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
            "in_kb_s": (bytes1[0] - bytes0[0]) / elapsed / 1e3, "out_kb_s": (bytes1[1] - bytes0[1]) / elapsed / 1e3,
            "pulls_s": len(sites) / poll, "box_cpu_pct": 100 * busy / elapsed / psutil.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--polls", type=float, nargs="+", default=[3.0, 1.0, 0.25])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ensure_synthetic_sites(data, 3, seed=0)
        folders = sorted(p for p in data.iterdir() if p.is_dir())
        sites = {f"site-{i:02d}": folders[i % len(folders)] for i in range(args.sites)}
        print("== the SuperLink alone (no SuperNode)", flush=True)
        alone = measure(1.0, {}, args.seconds, Path(tmp) / "alone")
        for poll in args.polls:
            print(f"== {args.sites} idle SuperNodes polling every {poll:g} s", flush=True)
            rows.append(measure(poll, sites, args.seconds, Path(tmp) / f"poll-{poll:g}"))
            print(rows[-1], flush=True)
    print(f"\n{args.sites} idle SuperNodes over TLS on one {psutil.cpu_count()}-core box, {args.seconds:.0f} s each\n")
    print("| poll interval | pulls/s (sites / interval) | SuperLink CPU (% of one core) | Fleet in (kB/s) | "
          "Fleet out (kB/s) | whole box CPU (%) |")
    print("|---|---|---|---|---|---|")
    print(f"| no SuperNode | 0 | {alone['superlink_cpu_pct']:.1f} | 0 | 0 | {alone['box_cpu_pct']:.0f} |")
    for row in rows:
        print(f"| {row['poll']:g} s | {row['pulls_s']:.1f} | {row['superlink_cpu_pct']:.1f} | {row['in_kb_s']:.1f} | "
              f"{row['out_kb_s']:.1f} | {row['box_cpu_pct']:.0f} |")


if __name__ == "__main__":
    main()
