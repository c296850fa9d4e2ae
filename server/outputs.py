"""Everything a run leaves behind, in one folder per run.

``metrics.jsonl``  one JSON line per round (round 0 = the untrained model, when evaluated)
``results.md``     the final per-site table
``model.pt``       the latest global model, for use: loadable anywhere (reid/saved_model.py)
``global_model.pt`` the latest global SHARED state with its round and model settings (for ``resume``)
``site_models.pt`` with clustering: the model each site trains from next
``metrics.png``    Rank-1 and mAP per site over rounds
``config.yaml``    the composed configuration
``report.html``    all of the above for a person, in one self-contained page (server/report.py)
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf

from reid.atomic import torch_save_atomically
from reid.config import SiteRunSpec
from reid.models import ModelSpec
from reid.saved_model import BATCHNORM_MISSING, BATCHNORM_OWN, ModelInfo, save_model
from strategies.held_out import unseen_results
from strategies.validation import UNSEEN_PROTOCOLS

METRICS_FILE = "metrics.jsonl"
TABLE_FILE = "results.md"
CHECKPOINT_FILE = "global_model.pt"
MODEL_FILE = "model.pt"
SITE_MODELS_FILE = "site_models.pt"
PLOT_FILE = "metrics.png"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".serverapp.lock"


class RunFolderBusy(RuntimeError):
    """Another ServerApp still holds the run folder."""


def hold_run_folder(folder: Path, wait_s: float = 600.0, on_wait: Callable[[str], None] | None = None,
                    report_every_s: float = 10.0) -> Any:
    """Take the run folder for this process (an exclusive ``flock``, released when the process ends)
    so that two ServerApps never write one folder: a resumed run waits (up to ``wait_s``, calling
    ``on_wait`` with the holder every ``report_every_s``) for a ServerApp left over from a crashed
    SuperLink to end. Returns the open lock file; keep it."""
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held for the life of the process
    start = time.monotonic()
    next_report = start
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            if time.monotonic() - start > wait_s:
                handle.close()
                raise RunFolderBusy(f"{folder} is still held by another ServerApp ({holder}) after {wait_s:.0f} s; "
                                    "stop it before resuming this run") from None
            if on_wait is not None and time.monotonic() >= next_report:
                on_wait(holder)
                next_report += report_every_s
            time.sleep(0.5)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def make_run_dir(base: str | Path, algorithm: str, run_id: int) -> Path:
    """``<base>/<timestamp>-<algorithm>-run<id>``, created; ``base`` made absolute first."""
    folder = Path(base).expanduser().resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{algorithm}-run{run_id}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


class RunOutputs:
    """Writes a run's files as rounds complete, so an interrupted run keeps what it finished."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rounds: list[dict[str, Any]] = []

    def write_config(self, cfg: DictConfig) -> None:
        (self.folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl and flush it to disk."""
        self.rounds.append(record)
        with open(self.folder / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _save_atomically(self, name: str, payload: dict[str, Any]) -> Path:
        """A crash never leaves half a file (reid/atomic.py)."""
        return torch_save_atomically(payload, self.folder / name)

    def save_checkpoint(self, state: dict[str, torch.Tensor], server_round: int, spec: ModelSpec,
                        extra: dict[str, Any]) -> Path:
        """The global model (``arrays.to_torch_state_dict()``) with its round and model settings."""
        return self._save_atomically(CHECKPOINT_FILE, {"state_dict": state, "round": server_round,
                                                       "model": asdict(spec), **extra})

    def save_model(self, state: dict[str, torch.Tensor], server_round: int, spec: SiteRunSpec, algorithm: str,
                   evaluation: dict[str, Any] | None) -> Path:
        """``model.pt``: the global model of ``server_round`` for whoever uses it, with the mean mAP of
        its evaluation (None when that round was not evaluated). Under ``bn_stats=local`` the
        server never learnt BatchNorm statistics, and the file says so."""
        mean = (evaluation or {}).get("mean") or {}
        info = ModelInfo(spec=spec.model, algorithm=algorithm, round=server_round, bn_stats=spec.bn_stats,
                         batchnorm=BATCHNORM_MISSING if spec.bn_stats == "local" else BATCHNORM_OWN,
                         run=self.folder.name, mAP=float(mean["mAP"]) if "mAP" in mean else None,
                         metrics={k: float(v) for k, v in mean.items() if isinstance(v, (int, float))},
                         eval_batch_size=spec.eval_batch_size)
        return save_model(self.folder / MODEL_FILE, state, info)

    def save_site_models(self, models: dict[str, ArrayRecord], nodes: dict[str, int], server_round: int,
                         spec: ModelSpec, extra: dict[str, Any]) -> Path:
        """The model each site trains from next (its cluster's), when sites do not share one, and the
        node id each site last replied from (so a resumed run can send them again)."""
        state = {site: arrays.to_torch_state_dict() for site, arrays in models.items()}
        return self._save_atomically(SITE_MODELS_FILE, {"state_dicts": state, "nodes": dict(nodes),
                                                        "round": server_round, "model": asdict(spec), **extra})

    def latest_evaluation(self) -> tuple[int, dict[str, dict[str, float]]] | None:
        """(round, per-site metrics) of the last evaluated round."""
        for record in reversed(self.rounds):
            if record.get("evaluate") and record["evaluate"].get("sites"):  # one where every site refused is none
                return record["round"], record["evaluate"]["sites"]
        return None

    def write_table(self, site_info: dict[str, dict[str, float]]) -> str:
        """The final per-site Markdown table, held-out sites under it (also returned, for the log)."""
        latest = self.latest_evaluation()
        if latest is None:
            text = "No evaluation was completed.\n"
        else:
            unseen = next((r.get("unseen") for r in self.rounds if r["round"] == latest[0] and r.get("evaluate")), None)
            text = format_table(latest[0], latest[1], site_info, unseen)
        (self.folder / TABLE_FILE).write_text(text)
        return text


def site_facts(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The latest training-round metrics each site reported (training images, identities or
    clusters, ...), from ``metrics.jsonl`` records: what the tables put beside the evaluation."""
    facts: dict[str, dict[str, float]] = {}
    for record in rounds:
        facts.update((record.get("train") or {}).get("sites") or {})
    return facts


TABLE_HEADER = ("site", "train images", "identities", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "mAP (Market)")
TABLE_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP", "mAP-market")


def table_rows(sites: dict[str, dict[str, float]], site_info: dict[str, dict[str, float]]) -> list[list[str]]:
    """The per-site rows under ``TABLE_HEADER`` (metrics in percent, one decimal) and a mean row. An
    unsupervised site reports no identities: its column shows the clusters it found instead."""
    rows = []
    for name in sorted(sites):
        info = site_info.get(name, {})
        identities = (str(int(info["num-identities"])) if "num-identities" in info
                      else f"{int(info['clusters'])} clusters" if "clusters" in info else "")
        rows.append([name, str(int(info.get("num-examples", 0))), identities,
                     *(f"{100 * sites[name].get(k, float('nan')):.1f}" for k in TABLE_KEYS)])
    if sites:  # a round in which every site refused has no mean (the table then says so by its emptiness)
        rows.append(["mean", "", "", *(f"{100 * sum(m.get(k, float('nan')) for m in sites.values()) / len(sites):.1f}"
                                       for k in TABLE_KEYS)])
    return rows


def unseen_rows(unseen: dict[str, Any] | None) -> list[list[str]]:
    """Rows for the held-out sites (never trained: generalisation), one block per protocol
    (source-only, target-adapted; strategies/held_out.py), each with its mean, under
    ``TABLE_HEADER``; the identities column names the model ranked there when it is not the global
    one (``local``: the best training site's own model)."""
    rows = []
    for protocol in UNSEEN_PROTOCOLS:
        sites = unseen_results(unseen, protocol).get("sites") or {}
        for name in sorted(sites):
            model = str(sites[name].get("model", "global"))
            rows.append([f"{name} (held out, {protocol})", "0", "" if model == "global" else f"model of {model}",
                         *(f"{100 * sites[name].get(k, float('nan')):.1f}" for k in TABLE_KEYS)])
        if len(sites) > 1:
            rows.append([f"mean, held out, {protocol}", "", "",
                         *(f"{100 * sum(m.get(k, float('nan')) for m in sites.values()) / len(sites):.1f}"
                           for k in TABLE_KEYS)])
    return rows


def format_table(server_round: int, sites: dict[str, dict[str, float]], site_info: dict[str, dict[str, float]],
                 unseen: dict[str, Any] | None = None) -> str:
    """Per-site Rank-1/5/10, mAP, mINP in percent, with training-set sizes and a mean row, in Markdown;
    held-out sites (``unseen``) below it.

    ``mAP`` is torchreid's (valid queries only); ``mAP (Market)`` is the original Market-1501
    trapezoid AP over all queries, which the FedReID code reports (see reid/metrics.py)."""
    rows = table_rows(sites, site_info)
    if sites:
        rows[-1][0] = "**mean**"
    held_out = [[f"**{row[0]}**", *row[1:]] if row[0].startswith("mean, held out") else row
                for row in unseen_rows(unseen)]
    caption = (f"Per-site results after round {server_round} (global model, each site's own query/gallery"
               + ("; held-out sites never trained" if held_out else "") + ")")
    return markdown_table(caption, TABLE_HEADER, rows + held_out)


def markdown_table(caption: str, header: Sequence[str], rows: list[list[str]]) -> str:
    """A caption and a Markdown table: first column left-aligned, the others right-aligned."""
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
