"""What RAF costs per local epoch, measured side by side in one process (machines here are noisy).

One site of synthetic-resdrift (generated if missing), the demo model, one epoch each of plain
training, RAF (distillation at ½ and ¼) and the augmentation-only baseline, in alternating order,
repeated; medians and ratios to plain training. Writes bench/results/raf_cost.txt.

    python bench/raf_cost.py [--site 0-sharp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from reid.data.dataset import load_reid_data  # noqa: E402
from reid.data.tensor_cache import training_images  # noqa: E402
from reid.device import pick_device  # noqa: E402
from reid.models import build_model  # noqa: E402
from reid.raf import MultiResolution, RAFConfig  # noqa: E402
from reid.train import train_local  # noqa: E402
from server import simulate  # noqa: E402
from server.config import compose_config, site_run_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="0-sharp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default="resdrift")
    args = parser.parse_args()
    root = REPO / "data" / "synthetic-resdrift"
    simulate.ensure_synthetic_sites(root, 4, 0, "synthetic-resdrift")
    spec = site_run_spec(compose_config({"profile": args.profile}))
    data = load_reid_data(root / args.site)
    images = training_images(data, spec.model.height, spec.model.width)
    device = pick_device()
    modes = {"plain": None, "raf (distill)": RAFConfig(enabled=True), "multi-res augment": RAFConfig(enabled=True,
                                                                                                     mode="augment")}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, cfg in modes.items():
            torch.manual_seed(0)
            model = build_model(spec.model, num_classes=data.num_train_ids)
            stats = train_local(model, images, spec.train, device, augment=spec.augment,
                                multires=MultiResolution(cfg) if cfg else None)
            seconds[name].append(stats.seconds)
    base = statistics.median(seconds["plain"])
    lines = [f"{args.site}: {len(images)} training images, {spec.model.backbone} at {spec.model.height}x"
             f"{spec.model.width}, one epoch, {device}, median of {args.repeats} (alternating order)", ""]
    for name, values in seconds.items():
        median = statistics.median(values)
        lines.append(f"{name:18s} {median:6.2f} s  x{median / base:4.2f}  ({', '.join(f'{v:.2f}' for v in values)})")
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "bench" / "results" / "raf_cost.txt"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
