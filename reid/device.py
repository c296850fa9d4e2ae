"""Where a site computes: its GPU when it has one (with mixed precision), the CPU otherwise."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def pick_device(gpu: int | None = None) -> torch.device:
    """``cuda:<gpu>`` (default the first visible GPU) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        index = 0 if gpu is None else gpu
        if index >= torch.cuda.device_count():
            raise ValueError(f"GPU {index} requested but only {torch.cuda.device_count()} visible")
        return torch.device(f"cuda:{index}")
    return torch.device("cpu")


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """fp16 autocast on CUDA; a no-op on the CPU, where fp32 is both faster and exact."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield
