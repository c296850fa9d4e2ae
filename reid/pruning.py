"""Unstructured magnitude pruning with a schedule, and FedKLPR's Cross-Round Recovery (CRR).

Only conv and linear weights of the SHARED state are pruned (biases and BatchNorm are left
dense): per tensor, the smallest-magnitude weights are zeroed until the scheduled ratio is met.
A site keeps its masks between rounds, re-applies them to every model it receives and after
every optimiser step, so pruned weights stay zero through local training.

CRR: pruning can cost accuracy that later rounds never win back. After each pruning step the
site compares, one round later (after the next local training), a validation signal with the
value it had just before pruning; if it fell by more than a threshold, the site restores the
previous masks and ratio (the restored positions take the received global values) and holds
that ratio for some rounds. Every recovery is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cubic", "constant")


@dataclass(frozen=True)
class PruningConfig:
    """Schedule of the pruning ratio (share of prunable weights set to zero) over rounds."""

    enabled: bool = False
    target: float = 0.5
    schedule: str = "linear"
    start_round: int = 1
    ramp_rounds: int = 10
    value_dtype: str = "float32"  # precision of the kept values on the wire: float32 or float16

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"pruning target must be in [0, 1), got {self.target}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pruning schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.value_dtype not in ("float32", "float16"):
            raise ValueError(f"value_dtype must be float32 or float16, got {self.value_dtype!r}")

    def ratio_at(self, server_round: int) -> float:
        """The scheduled ratio after round ``server_round`` (0 before ``start_round``)."""
        if not self.enabled or server_round < self.start_round:
            return 0.0
        progress = min(1.0, (server_round - self.start_round + 1) / max(1, self.ramp_rounds))
        if self.schedule == "constant":
            return self.target
        if self.schedule == "cubic":  # Zhu & Gupta (2017): fast at first, gentle near the target
            return self.target * (1.0 - (1.0 - progress) ** 3)
        return self.target * progress


@dataclass(frozen=True)
class CRRConfig:
    """Cross-Round Recovery: restore when the validation signal drops more than ``threshold``."""

    enabled: bool = True
    threshold: float = 0.05
    hold_rounds: int = 3


def prunable_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Conv (4-D) and linear (2-D) weights; biases, BatchNorm and buffers are never pruned."""
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)]


def magnitude_masks(state: dict[str, torch.Tensor], keys: list[str], ratio: float) -> dict[str, torch.Tensor]:
    """Per tensor, keep the ``1 - ratio`` largest-magnitude entries (ties broken by position)."""
    masks = {}
    for key in keys:
        flat = state[key].detach().abs().flatten()
        keep = flat.numel() - int(round(ratio * flat.numel()))
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)  # where the weights are
        if keep > 0:
            mask[torch.topk(flat.float(), keep, sorted=False).indices] = True
        masks[key] = mask.view_as(state[key])
    return masks


def mask_keeper(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A step hook that re-zeroes the pruned weights: the masks are cast to each weight's dtype and
    device once, and applied with one fused multiply over all tensors (no per-step copy or lookup)."""
    params = dict(model.named_parameters())
    weights = [params[key] for key in masks]
    factors = [mask.to(params[key].device, params[key].dtype) for key, mask in masks.items()]

    @torch.no_grad()
    def keep() -> None:
        if weights:  # nothing pruned yet: nothing to zero
            torch._foreach_mul_(weights, factors)

    return keep


def masks_to(masks: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The masks moved once to ``device``, so that re-applying them after every step copies nothing."""
    return {key: mask.to(device) for key, mask in masks.items()}


def masks_to_numpy(masks: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Boolean NumPy copies for storage and the wire, wherever the masks live."""
    return {key: mask.detach().cpu().numpy().astype(bool) for key, mask in masks.items()}


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place, once (``mask_keeper`` for every step)."""
    mask_keeper(model, masks)()


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    """Share of prunable weights kept (1.0 when nothing is pruned)."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(m.sum() for m in masks.values()) / total) if total else 1.0


@dataclass
class PruneState:
    """What a site remembers about its pruning between rounds."""

    ratio: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    previous_ratio: float = 0.0
    previous_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    reference: float = 0.0  # validation signal just before the last pruning step
    pending: bool = False  # that step still awaits its cross-round check
    hold_until: int = 0  # no pruning before this round
    recoveries: int = 0


def cross_round_check(state: PruneState, signal: float, server_round: int, cfg: CRRConfig,
                      site: str = "") -> dict[str, torch.Tensor] | None:
    """Judge the last pruning step by this round's ``signal``; restore it when it cost too much.

    On recovery the previous masks and ratio come back and pruning pauses for ``hold_rounds``
    rounds; the positions re-opened are returned (the caller fills them from the received global
    model). Returns None when the step is kept (or there was none to judge).
    """
    if not state.pending:
        return None
    state.pending = False
    if not cfg.enabled or signal >= state.reference - cfg.threshold:
        return None
    log.warning("%s round %d: validation fell from %.3f to %.3f after pruning to %.2f; restoring ratio %.2f "
                "and holding it for %d rounds", site, server_round, state.reference, signal, state.ratio,
                state.previous_ratio, cfg.hold_rounds)
    reopened = {key: previous & ~state.masks[key] for key, previous in state.previous_masks.items()}
    state.masks, state.ratio = state.previous_masks, state.previous_ratio
    state.hold_until = server_round + cfg.hold_rounds
    state.recoveries += 1
    return reopened


def prune_step(state: PruneState, state_dict: dict[str, torch.Tensor], signal: float, server_round: int,
               cfg: PruningConfig) -> bool:
    """Raise the pruning ratio to the schedule (unless holding); returns True when it pruned."""
    target = cfg.ratio_at(server_round)
    if server_round < state.hold_until or target <= state.ratio:
        return False
    keys = prunable_keys(state_dict)
    state.previous_masks = state.masks or {k: torch.ones_like(state_dict[k], dtype=torch.bool) for k in keys}
    state.previous_ratio = state.ratio
    state.reference = signal
    state.masks = magnitude_masks(state_dict, keys, target)
    state.ratio = target
    state.pending = True
    return True
