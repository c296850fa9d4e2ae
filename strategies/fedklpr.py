"""FedKLPR (Yu, Tseng, Chien, 2025; no public code, reconstructed): FedPav plus KL- and pruning-
ratio-weighted aggregation (KLPWA), one server-coordinated pruning mask with Cross-Round Recovery,
and sparse transmission of the pruned model in both directions.

The sites' side (the KL regularisation loss, the KL measurement KLAW needs, the held-back
identities CRR is judged on, training and uploading on the received mask) is clients/supervised.py.

KLPWA here: w_k ∝ n_k · a_k · b_k, with n_k the site's training images, a_k its KLAW factor and
b_k its PRAW factor (strategies/weighting.py), each normalised to mean 1. The reconstruction
without n_k let a site that barely moved in a round weigh almost nothing (0.00-0.02 on the nine
sites) however much data it held; ``klpwa.size: false`` switches that back for comparison. With
one mask for all, every site keeps the same fraction, so PRAW weighs them alike.

Per round, ``metrics.jsonl`` gets a ``pruning`` entry: the ratio and density of the global model,
whether a step was taken, the Cross-Round Recovery verdict with the sites judged, the pooled
drop and the noise floor, and the overlap of the uploads' masks (1.0: every site kept exactly the
positions the server sent).
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore import log

from strategies.fedpav import NUM_EXAMPLES, FedPav, Upload
from strategies.pruning_plan import PruningPlan, PruningSchedule, RecoveryRule, Signal, mask_overlap
from strategies.weighting import KLPWASpec, klpwa_weights

KL_DIVERGENCE = "kl-divergence"
KEPT_FRACTION = "kept-fraction"
HOLDOUT_MAP, HOLDOUT_SE, HOLDOUT_QUERIES = "holdout-map", "holdout-map-se", "holdout-queries"
TRAIN_ACCURACY = "train-accuracy"


class FedKLPR(FedPav):
    """FedPav with KLPWA weights and the federation's pruning plan (see the module's docstring)."""

    weightings = ("size", "cdw", "klpwa")

    def __init__(self, *, klpwa: KLPWASpec | None = None, pruning: PruningSchedule | None = None,
                 recovery: RecoveryRule | None = None, weighting: str = "klpwa", **options: Any) -> None:
        super().__init__(weighting=weighting, **options)
        self.klpwa = klpwa or KLPWASpec()
        self.plan = PruningPlan(pruning or PruningSchedule(), recovery or RecoveryRule())

    @property
    def required_train_metrics(self) -> tuple[str, ...]:
        if self.weighting == "klpwa":
            return (KL_DIVERGENCE, KEPT_FRACTION)
        return super().required_train_metrics

    def aggregation_weights(self, uploads: list[Upload]) -> np.ndarray:
        if self.weighting != "klpwa":
            return super().aggregation_weights(uploads)
        kl = np.array([u.metric(KL_DIVERGENCE) for u in uploads])
        kept = np.array([u.metric(KEPT_FRACTION) for u in uploads])
        sizes = np.array([u.metric(NUM_EXAMPLES) for u in uploads])
        return klpwa_weights(kl, kept, self.klpwa, sizes)

    def check_upload(self, upload: Upload) -> str | None:
        """An upload of a pruned model keeps exactly the positions the server sent."""
        for key, mask in self.masks.items():
            tensor = upload.tensors[key]
            if tensor.mask is not None and not np.array_equal(tensor.mask, mask):
                return f"array {key} keeps other positions than the mask the server sent"
            if tensor.mask is None and np.count_nonzero(tensor.values[~mask]):
                return f"array {key} has weights where the mask the server sent prunes them"
        return None

    def finish_global(self, server_round: int, arrays: ArrayRecord, uploads: list[Upload]) -> ArrayRecord:
        """Judge the last pruning step, recover or prune further, and note what happened."""
        overlap = mask_overlap([{k: t.mask for k, t in u.tensors.items() if t.mask is not None} for u in uploads])
        if not self.plan.schedule.enabled:
            self.last_train.notes["pruning"] = {"ratio": 0.0, "density": 1.0, "mask_overlap": overlap}
            return arrays
        signals = {u.site: Signal(u.metric(HOLDOUT_MAP), u.metric(HOLDOUT_SE), int(u.metric(HOLDOUT_QUERIES)))
                   for u in uploads if HOLDOUT_MAP in u.message.content["metrics"]}
        sizes = np.array([u.metric(NUM_EXAMPLES) for u in uploads])
        accuracy = float(np.average([u.metric(TRAIN_ACCURACY, 0.0) for u in uploads], weights=sizes))
        values = {k: a.numpy().copy() for k, a in arrays.items()}
        note = self.plan.advance(server_round, values, signals, accuracy)
        self.masks = dict(self.plan.masks)
        note.update({"mask_overlap": overlap, "train_accuracy": accuracy,
                     "signals": {s: {"mAP": v.mAP, "se": v.se, "queries": v.queries} for s, v in signals.items()}})
        self.last_train.notes["pruning"] = note
        if note.get("recovered"):
            log(WARNING, "round %d Cross-Round Recovery: %s; back to ratio %.2f, holding until round %d",
                server_round, note["crr"]["reason"], note["ratio"], note["hold_until"])
        elif note["step"]:
            log(INFO, "round %d: the global model is pruned to ratio %.2f (density %.3f)", server_round,
                note["ratio"], note["density"])
        return ArrayRecord({k: Array(v) for k, v in values.items()})

    def restore_global(self, arrays: ArrayRecord, rounds: list[dict]) -> None:
        notes = [r["train"]["pruning"] for r in rounds if (r.get("train") or {}).get("pruning")]
        if notes and self.plan.schedule.enabled:
            self.plan.restore(notes[-1], {k: a.numpy() for k, a in arrays.items()})
            self.masks = dict(self.plan.masks)
