"""Where a site computes: its GPU when it has one (with mixed precision), the CPU otherwise."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def pick_device(gpu: int | None = None) -> torch.device:
    """``cuda:<gpu>`` (default the first visible GPU) when CUDA is available, else the CPU.

    The one rule for sites (``--gpu``) and the server (KD, clustering embeddings)."""
    if torch.cuda.is_available():
        index = 0 if gpu is None else gpu
        if index >= torch.cuda.device_count():
            raise ValueError(f"GPU {index} requested but only {torch.cuda.device_count()} visible")
        return torch.device(f"cuda:{index}")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on a GPU that has it (no loss scaling needed), fp16 on an older GPU, none on the CPU
    (where fp32 is both faster and exact)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def needs_grad_scaler(device: torch.device) -> bool:
    """Only fp16 overflows without loss scaling."""
    return autocast_dtype(device) == torch.float16


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision at ``autocast_dtype(device)``; a no-op on the CPU."""
    dtype = autocast_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def tune_for(device: torch.device) -> None:
    """Let cuDNN pick the fastest kernels: shapes are fixed (the last incomplete batch is dropped)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
