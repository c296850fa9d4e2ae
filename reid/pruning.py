"""A pruned model on a site: keeping the weights a mask prunes at zero, and what the site reports.

The mask is not the site's to choose: FedKLPR's server prunes the global model and sends it with
its mask (strategies/pruning_plan.py says why), so every site trains and uploads on the same
positions. A site re-applies the received mask after every optimiser step, so pruned weights stay
zero through local training, and sends its kept values in the sparse encoding.

Cross-Round Recovery is judged by the server on identities each large enough site holds back
from its training (reid/holdout.py); ``CRRConfig`` says how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class PruningConfig:
    """What a site needs to know of pruning: whether the run prunes, and the kept values' precision
    on the wire (float32, exact, or float16)."""

    enabled: bool = False
    value_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.value_dtype not in ("float32", "float16"):
            raise ValueError(f"value_dtype must be float32 or float16, got {self.value_dtype!r}")


@dataclass(frozen=True)
class CRRConfig:
    """The site's part of Cross-Round Recovery: hold back ``holdout_fraction`` of its training
    identities (at least 2) as the signal, when it has at least ``min_identities``."""

    enabled: bool = True
    holdout_fraction: float = 0.05
    min_identities: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ValueError(f"crr.holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")


def prunable_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Conv (4-D) and linear (2-D) weights; biases, BatchNorm and buffers are never pruned."""
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)]


def mask_keeper(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """A step hook that re-zeroes the pruned weights: the masks are cast to each weight's dtype and
    device once, and applied with one fused multiply over all tensors (no per-step copy or lookup)."""
    params = dict(model.named_parameters())
    weights = [params[key] for key in masks]
    factors = [mask.to(params[key].device, params[key].dtype) for key, mask in masks.items()]

    @torch.no_grad()
    def keep() -> None:
        if weights:  # nothing pruned: nothing to zero
            torch._foreach_mul_(weights, factors)

    return keep


def masks_to(masks: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The masks moved once to ``device``, so that re-applying them after every step copies nothing."""
    return {key: mask.to(device) for key, mask in masks.items()}


def masks_to_numpy(masks: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Boolean NumPy copies for storage and the wire, wherever the masks live."""
    return {key: mask.detach().cpu().numpy().astype(bool) for key, mask in masks.items()}


def apply_masks(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place, once (``mask_keeper`` for every step)."""
    mask_keeper(model, masks)()


def kept_fraction(masks: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None) -> float:
    """Share of prunable weights kept (1.0 when nothing is pruned); with ``model``, over all of its
    prunable weights, masked or not."""
    if model is not None:
        state = model.state_dict()
        keys = prunable_keys(state)
        total = sum(state[k].numel() for k in keys)
        kept = sum(int(masks[k].sum()) if k in masks else state[k].numel() for k in keys)
        return kept / total if total else 1.0
    total = sum(m.numel() for m in masks.values())
    return float(sum(m.sum() for m in masks.values()) / total) if total else 1.0
