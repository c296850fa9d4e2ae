"""FedKLPR's pruning as the server coordinates it: one mask for the whole federation, a schedule that
waits for learning to start, and Cross-Round Recovery judged on a re-ID signal above its noise.

Why on the server: when every site prunes its own freshly trained model, the sites' masks differ,
the mask-aware average is their union (almost dense once there are nine sites), and each site
then throws away, by re-applying its own mask, what the others kept. Here the server prunes the
aggregated model by magnitude (per tensor, conv and linear weights only) and sends it pruned; the
sparse encoding carries the mask, so every site trains and uploads on the same mask and the
global model, its downloads and its uploads are all equally sparse.

Schedule: no step before ``start_round`` nor before the sites' size-weighted training accuracy
reaches ``start_accuracy`` (magnitudes of a model that has not learnt yet are initialisation
noise); then one step per round along a linear or cubic ramp of ``ramp_rounds`` steps to ``target``.

Cross-Round Recovery: each step is judged one round later, on what the sites report about
identities they held back from training (mAP, its standard error, the number of queries). Sites
with fewer than ``min_queries`` held-back queries are not judged (below the noise floor); the
pooled change over the judged sites, weighted by their queries, triggers a recovery when it
falls by more than ``threshold`` and by more than ``z`` pooled standard errors. A recovery
restores the previous mask (re-opened weights take their values from before the step), holds for
``hold_rounds`` and makes later steps ``backoff`` times smaller: it never jumps to the target.
Pure NumPy on named arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

SCHEDULES = ("linear", "cubic")


@dataclass(frozen=True)
class PruningSchedule:
    """When and how far the server prunes the global model."""

    enabled: bool = False
    target: float = 0.5
    schedule: str = "linear"
    ramp_rounds: int = 5
    start_round: int = 2
    start_accuracy: float = 0.5
    min_weights: int = 16384  # smaller tensors stay dense (the stem's first convolution, 9,408 in a ResNet)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"pruning target must be in [0, 1), got {self.target}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pruning schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.ramp_rounds < 1:
            raise ValueError(f"pruning.ramp_rounds must be >= 1, got {self.ramp_rounds}")

    def ratio_at(self, progress: float) -> float:
        """The pruning ratio at ``progress`` in [0, 1] along the ramp."""
        progress = min(max(progress, 0.0), 1.0)
        if self.schedule == "cubic":  # Zhu & Gupta (2017): fast at first, gentle near the target
            return self.target * (1.0 - (1.0 - progress) ** 3)
        return self.target * progress


@dataclass(frozen=True)
class RecoveryRule:
    """Cross-Round Recovery: when a pruning step is undone."""

    enabled: bool = True
    threshold: float = 0.02
    z: float = 2.0
    min_queries: int = 10
    hold_rounds: int = 2
    backoff: float = 0.5


@dataclass(frozen=True)
class Signal:
    """What a site reports about its held-back identities after local training."""

    mAP: float
    se: float
    queries: int


@dataclass(frozen=True)
class Verdict:
    """The judgement of one pruning step."""

    recover: bool
    judged: list[str]
    drop: float | None = None
    floor: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"recover": self.recover, "judged": self.judged, "drop": self.drop, "floor": self.floor,
                "reason": self.reason}


def judge(reference: Mapping[str, Signal], current: Mapping[str, Signal], rule: RecoveryRule) -> Verdict:
    """Whether the held-back mAP fell, pooled over the sites above the noise floor in both rounds."""
    judged = sorted(s for s in reference.keys() & current.keys()
                    if min(reference[s].queries, current[s].queries) >= rule.min_queries)
    if not judged:
        return Verdict(False, [], reason=f"no site has {rule.min_queries} held-back queries in both rounds")
    counts = np.array([min(reference[s].queries, current[s].queries) for s in judged], dtype=np.float64)
    drops = np.array([reference[s].mAP - current[s].mAP for s in judged])
    variances = np.array([reference[s].se ** 2 + current[s].se ** 2 for s in judged])
    drop = float((counts * drops).sum() / counts.sum())
    se = float(math.sqrt((counts ** 2 * variances).sum()) / counts.sum())
    floor = max(rule.threshold, rule.z * se)
    recover = drop > floor
    reason = (f"held-back mAP fell {drop:.3f} (> {floor:.3f})" if recover
              else f"held-back mAP changed by {-drop:+.3f} (recovery below -{floor:.3f})")
    return Verdict(recover, judged, drop, floor, reason)


def prunable_keys(arrays: Mapping[str, np.ndarray], min_weights: int = 0) -> list[str]:
    """Conv (4-D) and linear (2-D) weights of at least ``min_weights`` entries; biases, BatchNorm and
    buffers are never pruned."""
    return [k for k, v in arrays.items() if k.endswith(".weight") and np.ndim(v) in (2, 4)
            and np.size(v) >= min_weights]


def magnitude_mask(values: np.ndarray, ratio: float, pruned: np.ndarray | None = None) -> np.ndarray:
    """Keep the ``1 - ratio`` largest-magnitude entries; positions already ``pruned`` stay pruned."""
    flat = np.abs(np.asarray(values, dtype=np.float32)).reshape(-1)
    if pruned is not None:
        flat = np.where(np.ravel(pruned), np.float32(-1.0), flat)
    keep = flat.size - int(round(ratio * flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    if keep > 0:
        mask[np.argpartition(-flat, keep - 1)[:keep]] = True
    return mask.reshape(np.shape(values))


def density(masks: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> float:
    """Share of the prunable weights kept (1.0 without masks)."""
    keys = prunable_keys(arrays)
    total = sum(int(np.size(arrays[k])) for k in keys)
    kept = sum(int(masks[k].sum()) if k in masks else int(np.size(arrays[k])) for k in keys)
    return kept / total if total else 1.0


@dataclass
class PendingStep:
    """A step awaiting its judgement: what it replaced, and the signals from before it."""

    server_round: int
    previous_masks: dict[str, np.ndarray]
    previous_progress: float
    reference: dict[str, Signal]
    before: dict[str, np.ndarray]  # the prunable tensors just before the step (re-opened weights come from here)


@dataclass
class PruningPlan:
    """The federation's mask, its ratio and the recovery bookkeeping, round after round."""

    schedule: PruningSchedule
    recovery: RecoveryRule = field(default_factory=RecoveryRule)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    progress: float = 0.0
    delta: float = 0.0  # progress per step; set when pruning starts
    started: bool = False
    hold_until: int = 0
    recoveries: int = 0
    pending: PendingStep | None = None

    @property
    def ratio(self) -> float:
        return self.schedule.ratio_at(self.progress) if self.started else 0.0

    def _may_start(self, server_round: int, train_accuracy: float) -> bool:
        return server_round >= self.schedule.start_round and train_accuracy >= self.schedule.start_accuracy

    def advance(self, server_round: int, arrays: dict[str, np.ndarray], signals: Mapping[str, Signal],
                train_accuracy: float) -> dict[str, Any]:
        """After round ``server_round``'s aggregation: judge the last step on this round's ``signals``,
        recover or take the next step, and prune ``arrays`` in place. Returns the round's note."""
        note: dict[str, Any] = {"step": False, "crr": None, "recovered": False}
        for key, mask in self.masks.items():  # a refinement (KD) must not revive pruned weights
            arrays[key] = np.where(mask, arrays[key], np.float32(0)).astype(arrays[key].dtype)
        if self.pending is not None:
            if self.recovery.enabled:
                verdict = judge(self.pending.reference, signals, self.recovery)
                note["crr"] = {**verdict.as_dict(), "step_round": self.pending.server_round}
                if verdict.recover:
                    self._recover(server_round, arrays)
                    note["recovered"] = True
            self.pending = None
        if not note["recovered"]:
            if not self.started and self._may_start(server_round, train_accuracy):
                self.started, self.delta = True, 1.0 / self.schedule.ramp_rounds
            if self.started and server_round >= self.hold_until and self.progress < 1.0 - 1e-9:
                self._step(server_round, arrays, signals)
                note["step"] = True
        note.update({"ratio": self.ratio, "progress": self.progress, "delta": self.delta, "started": self.started,
                     "hold_until": self.hold_until, "recoveries": self.recoveries,
                     "density": density(self.masks, arrays)})
        return note

    def _step(self, server_round: int, arrays: dict[str, np.ndarray], signals: Mapping[str, Signal]) -> None:
        keys = prunable_keys(arrays, self.schedule.min_weights)
        previous = {k: m.copy() for k, m in self.masks.items()}
        before = {k: arrays[k].copy() for k in keys} if self.recovery.enabled else {}
        self.pending = PendingStep(server_round, previous, self.progress, dict(signals), before)
        self.progress = min(1.0, self.progress + self.delta)
        ratio = self.schedule.ratio_at(self.progress)
        for key in keys:
            pruned = None if key not in self.masks else ~self.masks[key]
            self.masks[key] = magnitude_mask(arrays[key], ratio, pruned)
            arrays[key] = np.where(self.masks[key], arrays[key], np.float32(0)).astype(arrays[key].dtype)

    def _recover(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        step = self.pending
        assert step is not None
        for key, before in step.before.items():
            previous = step.previous_masks.get(key)
            reopened = ~self.masks[key] if previous is None else previous & ~self.masks[key]
            arrays[key] = np.where(reopened, before, arrays[key]).astype(arrays[key].dtype)
        self.masks = step.previous_masks
        self.progress = step.previous_progress
        self.delta *= self.recovery.backoff
        self.hold_until = server_round + 1 + self.recovery.hold_rounds
        self.recoveries += 1

    def restore(self, note: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Continue a resumed run: the last round's note, and the masks as the checkpoint's zeros."""
        self.progress = float(note.get("progress", 0.0))
        self.delta = float(note.get("delta", 0.0))
        self.started = bool(note.get("started", False))
        self.hold_until = int(note.get("hold_until", 0))
        self.recoveries = int(note.get("recoveries", 0))
        if self.started and self.progress > 0:
            self.masks = {k: np.asarray(arrays[k]) != 0 for k in prunable_keys(arrays, self.schedule.min_weights)}


def mask_overlap(masks: list[Mapping[str, np.ndarray]]) -> float | None:
    """Intersection over union of the kept positions of several uploads' masks (1.0: all agree);
    None when fewer than two uploads carry masks."""
    masks = [m for m in masks if m]
    if len(masks) < 2:
        return None
    inter = union = 0
    for key in masks[0]:
        stack = [m[key] for m in masks if key in m]
        both, either = np.logical_and.reduce(stack), np.logical_or.reduce(stack)
        inter, union = inter + int(both.sum()), union + int(either.sum())
    return inter / union if union else 1.0
