"""TensorBoard scalars of a run (``telemetry.tensorboard=true``), the convention of torchreid and fast-reid.

Written into ``<run folder>/tensorboard/`` after every round, with the round as the step:

``eval/<site>/rank1``, ``eval/<site>/mAP``, ``eval/mean/rank1``, ``eval/mean/mAP`` (percent),
``unseen/<protocol>/<site>/mAP`` for held-out sites (source-only, target-adapted), ``train/<site>/loss``, ``train/<site>/accuracy``,
``train/mean/loss``, and ``bytes/down``, ``bytes/up`` of the training round.

``tensorboard --logdir outputs`` then shows every run side by side. Needs the ``tensorboard``
extra (``pip install 'fedreid[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from strategies.held_out import unseen_results
from strategies.validation import UNSEEN_PROTOCOLS

TENSORBOARD_DIR = "tensorboard"


def _percent(value: float) -> float:
    return 100.0 * float(value)


class TensorBoardScalars:
    """One run's event file; ``record_round`` takes a metrics.jsonl record."""

    def __init__(self, run_folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises this when the tensorboard package is missing
            raise RuntimeError(f"telemetry.tensorboard=true needs TensorBoard: pip install 'fedreid[tensorboard]' "
                               f"({error})") from None
        self.folder = run_folder / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def record_round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        add = self.writer.add_scalar
        train = record.get("train")
        if train:
            losses = []
            for site, metrics in train["sites"].items():
                if "train-loss" in metrics:
                    add(f"train/{site}/loss", float(metrics["train-loss"]), step)
                    losses.append(float(metrics["train-loss"]))
                if "train-accuracy" in metrics:
                    add(f"train/{site}/accuracy", _percent(metrics["train-accuracy"]), step)
            if losses:
                add("train/mean/loss", sum(losses) / len(losses), step)
            add("bytes/down", float(train["bytes"]["sent"]), step)
            add("bytes/up", float(train["bytes"]["received"]), step)
        evaluation = record.get("evaluate")
        if evaluation:
            for site, metrics in evaluation["sites"].items():
                add(f"eval/{site}/rank1", _percent(metrics["rank1"]), step)
                add(f"eval/{site}/mAP", _percent(metrics["mAP"]), step)
            if evaluation.get("mean"):
                add("eval/mean/rank1", _percent(evaluation["mean"]["rank1"]), step)
                add("eval/mean/mAP", _percent(evaluation["mean"]["mAP"]), step)
        for protocol in UNSEEN_PROTOCOLS:
            for site, metrics in (unseen_results(record.get("unseen"), protocol).get("sites") or {}).items():
                add(f"unseen/{protocol}/{site}/mAP", _percent(metrics["mAP"]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
