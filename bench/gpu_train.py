"""Site training speed, side by side in one run: the whole pipeline against the pure forward+backward
ceiling, FedKLPR against FedPav, evaluation, and peak memory.

    python bench/gpu_train.py                  # on a GPU: ResNet-50 at 256x128; on the CPU: the small model
    python bench/gpu_train.py --model small --images 512

The images are a synthetic uint8 tensor cache (decoding happens once per site and is not a
per-round cost). Rows:

* pipeline: ``train_local`` as a site runs it (cache on the device, per-sample augmentation on
  the device, the configured precision and memory format), batch 32;
* ceiling, eager: forward+backward+SGD step on one fixed, already normalised batch;
* ceiling, captured: the same step captured as one CUDA graph (GPU only);
* FedKLPR: ``train_local`` with the KL regulariser and pruning masks (ratio 0.5) re-applied after
  every step; FedPav is the pipeline row;
* evaluation: flip-summed features of the cache, eval batch 128.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reid.data.batch_augment import normalise  # noqa: E402
from reid.data.tensor_cache import LabelledImages, place  # noqa: E402
from reid.data.transforms import AugmentSpec  # noqa: E402
from reid.device import autocast, autocast_dtype, pick_device, tune_for  # noqa: E402
from reid.divergence import KLLConfig, kl_regulariser  # noqa: E402
from reid.features import extract_features  # noqa: E402
from reid.models import ModelSpec, build_model, split_state  # noqa: E402
from reid.pruning import apply_masks, mask_keeper  # noqa: E402
from reid.train import TrainConfig, make_optimizer, train_local  # noqa: E402
from strategies.pruning_plan import magnitude_mask, prunable_keys  # noqa: E402

MODELS = {"resnet50": ModelSpec(), "small": ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32)}
IDENTITIES = 751  # Market-1501's training identities


def synthetic_site(spec: ModelSpec, count: int, seed: int = 0) -> LabelledImages:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, spec.height, spec.width), dtype=torch.uint8, generator=generator)
    return LabelledImages(images, torch.randint(0, IDENTITIES, (count,), generator=generator))


def timed_train(spec: ModelSpec, site: LabelledImages, cfg: TrainConfig, device: torch.device,
                fedklpr: bool = False) -> float:
    """img/s of ``train_local`` (second call: the first warms cuDNN's autotuner and the allocator)."""
    torch.manual_seed(0)
    model = build_model(spec, IDENTITIES).to(device)
    extra, after = None, None
    if fedklpr:
        shared = {k: v.detach().cpu().numpy() for k, v in split_state(model.state_dict(), "local")[0].items()}
        masks = {k: torch.from_numpy(magnitude_mask(shared[k], 0.5)).to(device) for k in prunable_keys(shared)}
        apply_masks(model, masks)
        extra = kl_regulariser(model, KLLConfig(enabled=True))
        after = mask_keeper(model, masks)
    train_local(model, site, cfg, device, seed=0, augment=AugmentSpec(), extra_loss=extra, after_step=after)
    return train_local(model, site, cfg, device, seed=1, augment=AugmentSpec(), extra_loss=extra,
                       after_step=after).images_per_second


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling_eager(spec: ModelSpec, cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """img/s of forward+backward+step on one fixed batch: no data movement, no augmentation."""
    model, optimizer, x, y = _fixed_step_inputs(spec, cfg, device)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        with autocast(device):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _synchronise(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronise(device)
    return steps * len(y) / (time.perf_counter() - start)


def ceiling_captured(spec: ModelSpec, cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """img/s of the same step replayed as one CUDA graph (static input buffers, no launch overhead)."""
    model, optimizer, x, y = _fixed_step_inputs(spec, cfg, device)
    criterion = nn.CrossEntropyLoss()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            with autocast(device):
                loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        with autocast(device):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    graph.replay()
    _synchronise(device)
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    _synchronise(device)
    return steps * len(y) / (time.perf_counter() - start)


def _fixed_step_inputs(spec: ModelSpec, cfg: TrainConfig,
                       device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(spec, IDENTITIES).to(device).train()
    site = synthetic_site(spec, cfg.batch_size, seed=1)
    x = normalise(site.images.to(device))
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, make_optimizer(model, cfg), x, site.labels.to(device)


def evaluation_speed(spec: ModelSpec, site: LabelledImages, device: torch.device, batch: int = 128) -> float:
    model = build_model(spec).to(device)
    images = place(site.images, device, 1e9)
    extract_features(model, images[:batch], device, batch)  # warm-up
    _synchronise(device)
    start = time.perf_counter()
    extract_features(model, images, device, batch)
    _synchronise(device)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: resnet50 on a GPU, else small")
    parser.add_argument("--images", type=int, default=None, help="training images (default 4096 GPU, 256 CPU)")
    parser.add_argument("--gpu", type=int, default=None)
    args = parser.parse_args()
    device = pick_device(args.gpu)
    tune_for(device)
    name = args.model or ("resnet50" if device.type == "cuda" else "small")
    spec = MODELS[name]
    count = args.images or (4096 if device.type == "cuda" else 256)
    cfg = TrainConfig()
    site = synthetic_site(spec, count)
    steps = max(4, count // cfg.batch_size)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device)]
    print(f"{where}, torch {torch.__version__}, {name} at {spec.height}x{spec.width}, batch {cfg.batch_size}, "
          f"{count} images, {precision}, channels_last {cfg.channels_last and device.type == 'cuda'}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows: dict[str, float | str] = {}
    rows["pipeline (train_local, FedPav)"] = pipeline = timed_train(spec, site, cfg, device)
    rows["FedKLPR (KL loss + masks)"] = fedklpr = timed_train(spec, site, cfg, device, fedklpr=True)
    peak_training = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rows["ceiling, eager"] = eager = ceiling_eager(spec, cfg, device, steps)
    if device.type == "cuda":
        try:
            rows["ceiling, captured (CUDA graph)"] = ceiling_captured(spec, cfg, device, steps)
        except Exception as error:  # a capture failure is a result to report, not a crash
            rows["ceiling, captured (CUDA graph)"] = f"failed: {type(error).__name__}: {error}"[:120]
    rows["evaluation (flip-summed features)"] = evaluation_speed(spec, site, device)
    print("\n| measure | img/s |\n|---|---:|")
    for label, value in rows.items():
        print(f"| {label} | {value:,.0f} |" if isinstance(value, float) else f"| {label} | {value} |")
    print(f"\npipeline / eager ceiling: {pipeline / eager:.2f}")
    print(f"FedKLPR / FedPav: {fedklpr / pipeline:.2f}")
    label = "peak GPU memory allocated while training" if device.type == "cuda" else "peak RSS of this process"
    print(f"{label}: {peak_training / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
