"""`make gpu-check`: on a CUDA machine, the suite's tests that need no Ray, then one real TLS
deployment per algorithm (fedreid-server, 3 x fedreid-client --gpu 0, a submitted run) with
ResNet-50 at 256x128 on synthetic sites, 3 rounds each; one table at the end.

    python bench/gpu_check.py                 # what `make gpu-check` runs
    python bench/gpu_check.py --skip-tests --algorithms fedpav --model small --rounds 1   # a quick look

Exits non-zero when the tests fail or any run does not complete. The deployments use the same
harness as the end-to-end tests (tests/deployment.py): every piece is its own process on loopback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from reid.data.public import generate_public_set  # noqa: E402
from reid.data.synthetic import generate_site  # noqa: E402
from tests.deployment import Deployment  # noqa: E402

ALGORITHMS = ["fedpav", "fedklpr", "fedpav_cdw_kd", "fedpav_cluster"]
SITES = ["0-mall", "1-station", "2-campus"]


def run_tests() -> int:
    """Every test but the load tests and those that need Ray's simulation engine."""
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "not load and not ray"], cwd=REPO)


def deploy(algorithm: str, root: Path, sites: dict[str, Path], args: argparse.Namespace) -> dict:
    """One TLS deployment of ``algorithm``; its status and per-round figures."""
    root.mkdir(parents=True)
    generate_public_set(root / "data" / "synthetic-public", seed=0)  # KD and clustering read it (server cwd)
    deployment = Deployment(root, sites)
    outputs = root / "outputs"
    overrides = f"federation.rounds={args.rounds} federation.eval_every={args.rounds} model={args.model}"
    try:
        deployment.start_server()
        deployment.register_sites()
        for site in sites:
            deployment.start_client(site, None, "--gpu", str(args.gpu))
        deployment.wait_for_nodes(len(sites), timeout=300)
        run_id = deployment.submit(f'algorithm="{algorithm}" output-dir="{outputs}" overrides="{overrides}"')
        status = deployment.wait_finished(run_id, timeout=args.timeout)
    except Exception as error:  # a failed start is a row of the table, not the end of the check
        status = f"failed to start: {error}"[:200]
    finally:
        deployment.close()
    return {"status": status, **_figures(outputs)}


def _figures(outputs: Path) -> dict:
    folders = sorted(p for p in outputs.glob("*") if p.is_dir()) if outputs.is_dir() else []
    metrics = folders[-1] / "metrics.jsonl" if folders else None
    if metrics is None or not metrics.is_file():
        return {"rounds": 0}
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [line for line in lines if line["round"] > 0]
    sites = [s for line in trained for s in line["train"]["sites"].values()]
    return {
        "rounds": len(trained),
        "seconds": statistics.median(line["seconds"] for line in trained) if trained else float("nan"),
        "img_s": statistics.median(s["images-per-second"] for s in sites) if sites else float("nan"),
        "gpu_gb": max((s.get("gpu-peak-mb", 0.0) for s in sites), default=0.0) / 1e3,
        "failed": sorted({name for line in trained for name in line["train"]["failed"]}),
        "mAP": (lines[-1].get("evaluate") or {}).get("mean", {}).get("mAP"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--model", default="resnet50", help="conf/model/<name>.yaml (small: a quick look)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("note: no CUDA device; the sites train on the CPU", flush=True)
    tests_failed = False if args.skip_tests else run_tests() != 0
    failures = 0
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fedreid-gpu-check-") as tmp:
        sites = {}
        for index, name in enumerate(SITES):
            sites[name] = Path(tmp) / "sites" / name
            generate_site(sites[name], index, seed=0)
        for algorithm in args.algorithms:
            print(f"== {algorithm}: {args.rounds} rounds, {args.model}, 3 sites on GPU {args.gpu}", flush=True)
            rows[algorithm] = deploy(algorithm, Path(tmp) / algorithm, sites, args)
            print(json.dumps(rows[algorithm]), flush=True)
    print("\n| algorithm | status | rounds | s / round | site training img/s | peak GPU memory per site (GB) "
          "| failed sites | mean mAP |\n|---|---|---:|---:|---:|---:|---|---:|")
    for algorithm, row in rows.items():
        ok = row["status"] == "finished:completed" and row["rounds"] == args.rounds and not row.get("failed")
        failures += not ok
        if row["rounds"]:
            m_ap = "" if row["mAP"] is None else f"{100 * row['mAP']:.1f}"
            print(f"| {algorithm} | {row['status']} | {row['rounds']} | {row['seconds']:.1f} | {row['img_s']:.0f} | "
                  f"{row['gpu_gb']:.2f} | {', '.join(row['failed']) or '-'} | {m_ap} |")
        else:
            print(f"| {algorithm} | {row['status']} | 0 | | | | | |")
    tests = "skipped" if args.skip_tests else ("FAILED (see above)" if tests_failed else "passed")
    print(f"\ntests: {tests}; runs failed: {failures} of {len(rows)}")
    return 1 if failures or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
