"""Baseline: every site trains alone (no federation) with the demo's exact settings.

Same model, seed, data order, rounds x local epochs and per-round optimiser re-creation as a
FedPav run of the chosen profile; each site is then evaluated with its own model on its own
query/gallery. Prints the same per-site table as the ServerApp, to set the two side by side.

    python bench/local_baseline.py --sites-root data/synthetic --profile demo
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reid.data.dataset import ImageDataset, load_reid_data  # noqa: E402
from reid.data.transforms import train_transform  # noqa: E402
from reid.device import pick_device  # noqa: E402
from reid.evaluate import evaluate_model  # noqa: E402
from reid.models import build_model, load_shared_state, shared_state  # noqa: E402
from reid.seeding import stable_seed  # noqa: E402
from reid.train import train_local  # noqa: E402
from server.config import compose_config, federation_settings, site_run_spec  # noqa: E402
from server.outputs import format_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--overrides", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = compose_config({"profile": args.profile, "overrides": args.overrides})
    spec, settings = site_run_spec(cfg), federation_settings(cfg)
    device = pick_device()
    torch.manual_seed(spec.seed)  # the same initial backbone the ServerApp sends out
    initial = shared_state(build_model(spec.model), spec.bn_stats)
    results, info = {}, {}
    for site_root in sorted(p for p in args.sites_root.iterdir() if p.is_dir()):
        start = time.perf_counter()
        data = load_reid_data(site_root)
        torch.manual_seed(stable_seed(spec.seed, site_root.name))
        model = build_model(spec.model, num_classes=data.num_train_ids)
        load_shared_state(model, {k: v.clone() for k, v in initial.items()}, spec.bn_stats)
        dataset = ImageDataset.for_training(data, train_transform(spec.augment, spec.model.height, spec.model.width))
        for server_round in range(1, settings.rounds + 1):
            train_local(model, dataset, spec.train, device, seed=stable_seed(spec.seed, site_root.name, server_round))
        result = evaluate_model(model, data, device, spec.eval_batch_size)
        results[site_root.name] = {"rank1": result.rank(1), "rank5": result.rank(5), "rank10": result.rank(10),
                                   "mAP": result.mAP, "mINP": result.mINP}
        info[site_root.name] = {"num-examples": len(dataset), "num-identities": data.num_train_ids}
        print(f"{site_root.name}: trained alone for {settings.rounds} x {spec.train.local_epochs} epochs "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(format_table(settings.rounds, results, info).replace("global model", "local models, no federation"))


if __name__ == "__main__":
    main()
