"""Write a torch file so that a crash never leaves half of it: a temporary beside it, then a rename.

The temporary's name carries the writer's process id, so two processes writing the same file (two
simulated sites sharing an image cache) never write into one temporary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def torch_save_atomically(payload: Any, path: Path) -> Path:
    """``torch.save(payload, path)``, atomically; the folder is created when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path
