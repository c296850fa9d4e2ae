"""A site's pruning state (masks, ratio, Cross-Round Recovery bookkeeping) in ``context.state``."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from reid.pruning import PruneState, masks_to_numpy

MASKS_KEY = "pruning-masks"
PREVIOUS_MASKS_KEY = "pruning-previous-masks"
SCALARS_KEY = "pruning-state"
_SCALARS = ("ratio", "previous_ratio", "reference", "pending", "hold_until", "recoveries")


def _masks(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(array.numpy().astype(bool)) for key, array in record.items()}


def load_prune_state(state: RecordDict) -> PruneState:
    """The site's pruning state from earlier rounds, or a fresh (unpruned) one."""
    if SCALARS_KEY not in state.config_records:
        return PruneState()
    scalars = state.config_records[SCALARS_KEY]
    return PruneState(
        ratio=float(scalars["ratio"]), previous_ratio=float(scalars["previous_ratio"]),
        reference=float(scalars["reference"]), pending=bool(scalars["pending"]),
        hold_until=int(scalars["hold_until"]), recoveries=int(scalars["recoveries"]),
        masks=_masks(state.array_records[MASKS_KEY]) if MASKS_KEY in state.array_records else {},
        previous_masks=(_masks(state.array_records[PREVIOUS_MASKS_KEY])
                        if PREVIOUS_MASKS_KEY in state.array_records else {}),
    )


def save_prune_state(state: RecordDict, prune: PruneState) -> None:
    """Store it for the next round (it never leaves the site)."""
    state[SCALARS_KEY] = ConfigRecord({name: getattr(prune, name) for name in _SCALARS})
    state[MASKS_KEY] = ArrayRecord({k: Array(m) for k, m in masks_to_numpy(prune.masks).items()})
    state[PREVIOUS_MASKS_KEY] = ArrayRecord({k: Array(m) for k, m in masks_to_numpy(prune.previous_masks).items()})
