"""A site's images decoded once into a uint8 tensor [N, 3, H, W] at the model's input size.

Why: decoding and resizing JPEGs with PIL costs more per image than a ResNet-50 step on a GPU, so
a site that decodes every epoch cannot feed its GPU. Decoded once, 12,936 Market-1501 images at
256x128 are 1.3 GB of uint8: they fit on a GPU, and the augmentation then runs there
(reid/data/batch_augment.py).

* **Same pixels as the PIL path**: each image is converted to RGB and resized with PIL's bicubic
  filter, exactly what ``transforms.Resize`` does to a PIL image, so ``decoded / 255`` equals
  ``ToTensor(Resize(image))``.
* **Reuse**: one decode per process and image list (a simulation's workers live across rounds);
  with a ``cache_dir`` also on disk, keyed by every file's path, size and mtime and the input size,
  so a fresh ClientApp process (one per message in a deployment) reads one file instead.
* **Placement**: on the GPU when it fits ``budget_mb``, otherwise in pinned host memory (CUDA), or
  plain host memory on a CPU site.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from reid.atomic import torch_save_atomically
from reid.data.dataset import ReIDData

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the decoded pixels would change
MEMO_BYTES = int(float(os.environ.get("FEDREID_IMAGE_MEMO_MB", "4096")) * 1e6)  # per process, least recent out
_IN_PROCESS: OrderedDict[str, torch.Tensor] = OrderedDict()


def resize_picture(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB, bicubic resize to (height, width): [H, W, 3] uint8, the pixels ``transforms.Resize`` gives."""
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    return np.array(resized, dtype=np.uint8)  # a writable copy


def decode_image(path: Path, height: int, width: int) -> np.ndarray:
    """One image file as ``resize_picture`` gives it."""
    with Image.open(path) as image:
        return resize_picture(image, height, width)


def decode_images(paths: Sequence[Path], height: int, width: int, workers: int = 4) -> torch.Tensor:
    """[N, 3, H, W] uint8; PIL releases the GIL while it decodes, so threads overlap."""
    out = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, pixels in enumerate(pool.map(lambda p: decode_image(p, height, width), paths)):
            out[index] = torch.from_numpy(pixels).permute(2, 0, 1)
    return out


def cache_key(paths: Sequence[Path], height: int, width: int) -> str:
    """Changes when any file is added, removed, rewritten (size or mtime) or the input size changes."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {height}x{width} {len(paths)}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _read(file: Path, count: int, height: int, width: int) -> torch.Tensor | None:
    try:
        images = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: decode again, and say so
        log.warning("image cache %s unreadable (%s); decoding again", file, error)
        return None
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != (count, 3, height, width) \
            or images.dtype != torch.uint8:
        log.warning("image cache %s does not match its key; decoding again", file)
        return None
    os.utime(file)  # in use: a site that bounds its cache keeps the most recently used files
    return images


def _write(file: Path, images: torch.Tensor) -> None:
    """Atomically: a crash never leaves half a cache behind."""
    torch_save_atomically(images, file)


def load_images(paths: Sequence[Path], height: int, width: int, cache_dir: Path | None = None,
                workers: int = 4, label: str = "", key: str | None = None) -> torch.Tensor:
    """The decoded images (host memory), from this process's memo, the disk cache, or PIL.
    ``key``: their ``cache_key``, when the caller has it already (one stat per file, not two)."""
    key = key or cache_key(paths, height, width)
    if key in _IN_PROCESS:
        _IN_PROCESS.move_to_end(key)
        return _IN_PROCESS[key]
    file = cache_dir / f"images-{key}.pt" if cache_dir is not None else None
    images = _read(file, len(paths), height, width) if file is not None and file.is_file() else None
    if images is not None:
        log.info("%s loaded %d decoded images from the disk cache", label, len(paths))
    else:
        start = time.perf_counter()
        images = decode_images(paths, height, width, workers)
        log.info("%s decoded %d images at %dx%d in %.1f s (%.0f MB)", label, len(paths), height, width,
                 time.perf_counter() - start, images.numel() / 1e6)
        if file is not None:
            _write(file, images)
    _remember(key, images)
    return images


def _remember(key: str, images: torch.Tensor) -> None:
    """Keep the newest decodes within MEMO_BYTES (a simulation worker may serve many sites)."""
    _IN_PROCESS[key] = images
    while len(_IN_PROCESS) > 1 and sum(t.numel() for t in _IN_PROCESS.values()) > MEMO_BYTES:
        _IN_PROCESS.popitem(last=False)


@dataclass(frozen=True)
class LabelledImages:
    """Decoded training images and their classifier labels (0..C-1 in sorted pid order)."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def training_images(data: ReIDData, height: int, width: int, cache_dir: Path | None = None,
                    workers: int = 4) -> LabelledImages:
    """A site's training split, decoded (or read from the cache) and labelled for its classifier."""
    label_of = {pid: label for label, pid in enumerate(data.train_pids)}
    images = load_images([s.path for s in data.train], height, width, cache_dir, workers, label=data.name)
    return LabelledImages(images, torch.tensor([label_of[s.pid] for s in data.train], dtype=torch.long))


def place(images: torch.Tensor, device: torch.device, budget_mb: float) -> torch.Tensor:
    """On ``device`` when it is a GPU and the images fit ``budget_mb``; pinned host memory otherwise."""
    if device.type != "cuda":
        return images
    if images.numel() <= budget_mb * 1e6:
        return images.to(device)
    log.info("images (%.0f MB) exceed the GPU cache budget (%.0f MB): kept in pinned host memory",
             images.numel() / 1e6, budget_mb)
    return images.pin_memory()
