"""Load: 20 real SuperNodes over TLS with authentication, and a Ray simulation of 100 sites.

Not part of `make test` (marked ``load``); `make test-load` runs them and prints the figures the
README quotes: peak memory, seconds per round and bytes per round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.deployment import Deployment
from tests.memory import EVERYTHING, PeakMemory, tagged_environment

pytestmark = pytest.mark.load
REPO = Path(__file__).resolve().parent.parent


def _rounds(outputs: Path) -> list[dict]:
    (folder,) = [p for p in outputs.iterdir() if p.is_dir()]
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _report(title: str, rounds: list[dict], memory: PeakMemory) -> str:
    seconds = [r["seconds"] for r in rounds if r["round"] > 0]
    up = [r["train"]["bytes"]["received"] for r in rounds if r["round"] > 0]
    down = [r["train"]["bytes"]["sent"] for r in rounds if r["round"] > 0]
    lines = [f"== {title}",
             f"rounds: {len(seconds)}, seconds per round: median {statistics.median(seconds):.1f} "
             f"(min {min(seconds):.1f}, max {max(seconds):.1f})",
             f"bytes per training round: {statistics.median(down) / 1e6:.1f} MB down, "
             f"{statistics.median(up) / 1e6:.1f} MB up (median)"]
    lines += [f"peak memory (PSS) of {name}: {memory.gib(name):.2f} GiB" for name in memory.groups]
    text = "\n".join(lines)
    print("\n" + text)
    return text


def test_twenty_supernodes_over_tls_complete_three_rounds_with_every_site(tiny_sites: Path, tmp_path: Path) -> None:
    data = sorted(p for p in tiny_sites.iterdir() if p.is_dir())
    sites = {f"site-{i:02d}": data[i % len(data)] for i in range(20)}  # several boxes share a site's images
    tag, env = tagged_environment()
    deployment = Deployment(tmp_path, sites, env=env)
    outputs = tmp_path / "outputs"
    overrides = ("federation.rounds=3 federation.eval_every=10 federation.eval_at_start=false "
                 "federation.min_sites=20 federation.round_timeout_s=1800")
    groups = {"the SuperLink": lambda c: "server.superlink_main" in c, "the ServerApp": lambda c: "flwr-serverapp" in c,
              "the whole deployment (20 SuperNodes, their ClientApps, the SuperLink)": lambda _c: True}
    with PeakMemory(tag, groups) as memory:
        try:
            deployment.start_server()
            registered = deployment.register_sites()
            assert all(r.startswith("registered") for r in registered.values()), registered
            for site in sites:
                deployment.start_client(site)
            deployment.wait_for_nodes(20, timeout=600)
            run_id = deployment.submit(f'profile="test" output-dir="{outputs}" overrides="{overrides}"')
            status = deployment.wait_finished(run_id, timeout=3600)
            assert status == "finished:completed", deployment.log("server.log")[-3000:]
        finally:
            deployment.close()
    rounds = _rounds(outputs)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for record in rounds:
        assert set(record["train"]["sites"]) == set(sites), record["train"]["failed"]
        assert not record["train"]["rejected"] and not record["train"]["failed"]
    assert set(rounds[-1]["evaluate"]["sites"]) == set(sites)
    _report("20 SuperNodes, TLS + authentication, small model, 3 rounds", rounds, memory)


def test_a_simulation_of_a_hundred_sites_samples_a_tenth_per_round_for_five_rounds(tiny_sites: Path,
                                                                                  tmp_path: Path) -> None:
    data = sorted(p for p in tiny_sites.iterdir() if p.is_dir())
    sites_root = tmp_path / "sites"
    sites_root.mkdir()
    for i in range(100):  # a hundred site folders over three sets of images
        (sites_root / f"site-{i:03d}").symlink_to(data[i % len(data)], target_is_directory=True)
    tag, env = tagged_environment()
    command = [sys.executable, "-m", "server.simulate", "--profile", "test", "--sites", "100", "--sites-root",
               str(sites_root), "--no-generate", "--output-dir", str(tmp_path / "outputs"), "--flwr-home",
               str(tmp_path / "flwr-home"), "--overrides",
               "federation.rounds=5 federation.fraction_train=0.1 federation.fraction_evaluate=0.1 "
               "federation.eval_every=5 federation.eval_at_start=false federation.min_sites=10"]
    with PeakMemory(tag, EVERYTHING) as memory:
        done = subprocess.run(command, cwd=REPO, text=True, capture_output=True, timeout=3600,
                              env={**os.environ, **env})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = _rounds(tmp_path / "outputs")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    chosen = [sorted(r["train"]["sites"]) for r in rounds]
    assert all(len(c) == 10 and not r["train"]["failed"] for c, r in zip(chosen, rounds)), chosen
    assert len({tuple(c) for c in chosen}) > 1  # a different tenth each round
    assert len(rounds[-1]["evaluate"]["sites"]) == 10
    assert memory.peaks["all"] < 0.8 * psutil.virtual_memory().total
    _report("Ray simulation, 100 sites, fraction_train 0.1, 5 rounds", rounds, memory)
