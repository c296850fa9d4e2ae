"""Continue an interrupted run from its last completed round (run config ``resume``).

A run folder holds everything needed: ``config.yaml`` (the composed configuration, reused as is so
the continued run is the same experiment), ``global_model.pt`` (the global model after the last
checkpointed round; a run that died before its first checkpoint starts over in the same folder), ``site_models.pt`` (per-site models when clustering) and ``metrics.jsonl``.

Each round appends its metrics line first and then replaces the checkpoint, so a crash between the
two leaves one line more than the checkpoint holds; that line is dropped here and its round is
trained again. Every completed round therefore appears exactly once in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from server.outputs import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SITE_MODELS_FILE


class ResumeError(RuntimeError):
    """There is nothing to resume, or the run folder is inconsistent."""


@dataclass
class ResumePoint:
    """Where a run (re)starts: a new run is one at round 1 with nothing done yet."""

    folder: Path
    next_round: int
    arrays: ArrayRecord | None  # None: no round has finished; start from the initial model
    rounds: list[dict[str, Any]]
    site_models: dict[str, ArrayRecord] = field(default_factory=dict)
    site_nodes: dict[str, int] = field(default_factory=dict)


def find_run_folder(output_dir: Path, resume: str) -> Path:
    """``resume`` is a run folder, or ``latest``: the newest run folder under ``output_dir`` (folder
    names start with the run's start time)."""
    if resume != "latest":
        folder = Path(resume).expanduser()
        folder = folder if folder.is_absolute() else output_dir / folder
        if not (folder / CONFIG_FILE).is_file():
            raise ResumeError(f"cannot resume from {folder}: it holds no {CONFIG_FILE}, so it is not a run folder")
        return folder.resolve()
    candidates = sorted(p for p in output_dir.glob("*") if (p / CONFIG_FILE).is_file())
    if not candidates:
        raise ResumeError(f"resume=latest: no run folder (with a {CONFIG_FILE}) under {output_dir}")
    return candidates[-1].resolve()


def _rewrite_metrics(path: Path, lines: list[dict[str, Any]]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    os.replace(temporary, path)


def load_resume_point(folder: Path) -> ResumePoint:
    """Read the checkpoint and the metrics lines it covers (dropping any later, unfinished line)."""
    if not (folder / CONFIG_FILE).is_file():
        raise ResumeError(f"cannot resume from {folder}: it holds no {CONFIG_FILE}")
    checkpoint = (torch.load(folder / CHECKPOINT_FILE, weights_only=True)
                  if (folder / CHECKPOINT_FILE).is_file() else None)
    done = int(checkpoint["round"]) if checkpoint else 0  # died before its first checkpoint: start over
    metrics = folder / METRICS_FILE
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    kept = [line for line in lines if int(line["round"]) <= done]  # round 0 = the untrained model
    if len(kept) != len(lines):
        _rewrite_metrics(metrics, kept)
    point = ResumePoint(folder=folder, next_round=done + 1, rounds=kept,
                        arrays=ArrayRecord(checkpoint["state_dict"]) if checkpoint else None)
    site_file = folder / SITE_MODELS_FILE
    if site_file.is_file():
        saved = torch.load(site_file, weights_only=True)
        if int(saved["round"]) == done:
            point.site_models = {site: ArrayRecord(state) for site, state in saved["state_dicts"].items()}
            point.site_nodes = {site: int(node) for site, node in saved.get("nodes", {}).items()}
    return point
