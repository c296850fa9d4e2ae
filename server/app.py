"""The ServerApp: compose the configuration, build the global model, run the rounds, write results."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from flwr.supercore.logger import update_console_handler
from omegaconf import DictConfig, OmegaConf

from reid.distill import DistillConfig
from reid.models import build_model, shared_state
from server.background import BackgroundWrites
from server.config import compose_config, compression_spec, federation_settings, pruning_specs, site_run_spec
from server.faults import pause_point
from server.outputs import (CONFIG_FILE, MODEL_FILE, PLOT_FILE, RunOutputs, hold_run_folder, make_run_dir,
                            site_facts)
from server.plots import plot_site_metrics
from server.public_steps import PublicSteps
from server.report import write_report
from server.resume import ResumePoint, find_run_folder, load_resume_point
from server.rounds import FederationRunner
from server.telemetry import FederationGauges
from server.tensorboard_log import TensorBoardScalars
from strategies.clustering import ClusteringSpec
from strategies.fedklpr import KL_DIVERGENCE, FedKLPR
from strategies.fedpav import CDW_DISTANCE, NUM_EXAMPLES, FedPav
from strategies.packing import TRANSPORT_DTYPE_KEY, TransportSpec
from strategies.screening import ScreenSpec
from strategies.transfer import build_transfer
from strategies.wire import LOCAL_PULL_BACKOFF_CAP_S, pull_promptly
from strategies.validation import ALGORITHM_KEY, RUN_FOLDER_KEY, RUN_TAG_KEY, SHARE_BN_KEY, SOURCE_ONLY
from strategies.weighting import KLPWASpec

app = ServerApp()
IN_MEMORY_POLL_S = 0.02  # how often a simulation's ServerApp looks for replies (a dict lookup, not a request)


def transport_spec(cfg: DictConfig) -> TransportSpec:
    return TransportSpec(pack=bool(cfg.transport.pack), dtype=str(cfg.transport.dtype))


def build_strategy(cfg: DictConfig) -> FedPav:
    """The aggregation the ``algorithm`` preset describes, with its server-side steps wired in:
    FedKLPR's strategy when the preset weighs by KLPWA or prunes, FedPav's otherwise."""
    settings = federation_settings(cfg)
    algo = cfg.algorithm
    clustering = ClusteringSpec(method=str(algo.clustering.method), max_distance=float(algo.clustering.max_distance),
                                k=int(algo.clustering.k), seed=int(cfg.seed),
                                embedding=str(algo.clustering.get("embedding", "features")))
    public = None
    if algo.kd.enabled or clustering.needs_embeddings:
        kd = DistillConfig(lr=float(algo.kd.lr), epochs=int(algo.kd.epochs), batch_size=int(algo.kd.batch_size))
        public = PublicSteps(cfg.public.root, site_run_spec(cfg), kd, embed_batch=int(cfg.public.embed_batch))

    def mode(value: object) -> str:  # YAML reads an unquoted `off` as False
        return "off" if value is False else str(value)

    options = dict(
        min_sites=settings.min_sites,
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        weighting=str(algo.weighting),
        refine=public.refine if public is not None and algo.kd.enabled else None,
        refine_every=int(algo.kd.every),
        clustering=clustering,
        embed=public.embed if public is not None and clustering.needs_embeddings else None,
        transfer=build_transfer(compression_spec(cfg), transport_spec(cfg), bool(algo.sparse_downlink)),
        screen=ScreenSpec(**OmegaConf.to_container(algo.screen, resolve=True)),  # type: ignore[arg-type]
        held_out=settings.held_out,
        unseen_protocols=settings.unseen_protocols,
        share_styles=bool(algo.style.enabled and algo.style.share),
        seed=int(cfg.seed),
    )
    if str(algo.weighting) == "klpwa" or bool(algo.pruning.enabled):
        schedule, recovery = pruning_specs(cfg)
        klpwa = KLPWASpec(klaw=mode(algo.klpwa.klaw), praw=mode(algo.klpwa.praw), size=bool(algo.klpwa.size),
                          temperature=float(algo.klpwa.temperature))
        return FedKLPR(klpwa=klpwa, pruning=schedule, recovery=recovery, **options)  # type: ignore[arg-type]
    return FedPav(**options)  # type: ignore[arg-type]


CHANGE_METRICS = frozenset({CDW_DISTANCE, KL_DIVERGENCE})  # what a site's change probe measures


def measures_change(strategy: FedPav) -> bool:
    """Whether the sites must run their change probe: only when the strategy requires what it measures."""
    return bool(CHANGE_METRICS & set(strategy.required_train_metrics))


def restore_history(strategy: FedPav, rounds: list[dict[str, Any]]) -> None:
    """What a resumed run's strategy learnt in the rounds already done: which node answered under
    which name (for naming sites that stay silent) and the most training images each site reported."""
    for record in rounds:
        train = record.get("train") or {}
        for site, node in (train.get("nodes") or {}).items():
            strategy.names.learnt[int(node)] = site
        for site, metrics in (train.get("sites") or {}).items():
            if NUM_EXAMPLES in metrics:
                strategy.examples.record(site, float(metrics[NUM_EXAMPLES]))


def initial_arrays(cfg: DictConfig) -> ArrayRecord:
    """The seeded global model's SHARED arrays (ImageNet backbone when a local file is given)."""
    spec = site_run_spec(cfg)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=0, pretrained=cfg.model.pretrained)
    return ArrayRecord(shared_state(model, spec.bn_stats))


_held: list[Any] = []  # the run folder's lock file, open for as long as this process runs


def _hold(folder: Path) -> None:
    _held.append(hold_run_folder(folder, on_wait=lambda holder: log(
        WARNING, "%s is still held by another ServerApp (%s); waiting for it to end", folder, holder)))


def _start(context: Context) -> tuple[DictConfig, ResumePoint]:
    """Where the run starts: a new run folder at round 1, or with run config ``resume`` the
    interrupted run's folder, its saved config and its last checkpoint."""
    resume = str(context.run_config.get("resume", "") or "")
    if not resume:
        cfg = compose_config(context.run_config)
        folder = make_run_dir(cfg.output.dir, str(cfg.algorithm.name), context.run_id)
        _hold(folder)
        RunOutputs(folder).write_config(cfg)
        return cfg, ResumePoint(folder=folder, next_round=1, arrays=None, rounds=[])
    output_dir = Path(compose_config(context.run_config).output.dir).expanduser().resolve()
    folder = find_run_folder(output_dir, resume)
    _hold(folder)
    point = load_resume_point(folder)
    cfg = OmegaConf.load(point.folder / CONFIG_FILE)
    assert isinstance(cfg, DictConfig)
    log(INFO, "resuming %s after round %d (run %s)", point.folder, point.next_round - 1, context.run_id)
    return cfg, point


def _gauges(cfg: DictConfig, outputs: RunOutputs) -> FederationGauges:
    gauges = FederationGauges(outputs.folder, str(cfg.algorithm.name))
    port = int(cfg.telemetry.prometheus_port)
    if port > 0:
        try:
            gauges.serve(port, str(cfg.telemetry.host))
        except OSError as error:  # a busy port must not cost the run
            log(WARNING, "Prometheus endpoint on %s:%d not started: %s", cfg.telemetry.host, port, error)
    return gauges


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a whole federation as configured by conf/ plus this run's run config (or resume one)."""
    logging.getLogger("reid").setLevel(logging.INFO)
    update_console_handler(timestamps=True, colored=False)  # the run log says when each round's steps happened
    # a site's reply is listed before its arrays arrive: ask again for them soon, not after 1 s (strategies/wire.py)
    pull_promptly(http_grid, LOCAL_PULL_BACKOFF_CAP_S)
    cfg, point = _start(context)
    outputs = RunOutputs(point.folder)
    outputs.rounds = point.rounds
    spec = site_run_spec(cfg)
    settings = federation_settings(cfg)
    if isinstance(grid, InMemoryGrid):  # a simulation: asking for replies is a lookup in this process's memory
        settings = replace(settings, poll_interval_s=min(settings.poll_interval_s, IN_MEMORY_POLL_S))
    log(INFO, "fedreid run %s: %s, %s at %dx%d, %d rounds, outputs in %s", context.run_id, cfg.algorithm.name,
        spec.model.backbone, spec.model.height, spec.model.width, settings.rounds, outputs.folder)
    started = time.time() - (outputs.rounds[-1].get("elapsed_s", 0.0) if outputs.rounds else 0.0)
    strategy = build_strategy(cfg)
    spec = replace(spec, measure_change=measures_change(strategy))
    gauges = _gauges(cfg, outputs)
    scalars = TensorBoardScalars(outputs.folder) if cfg.telemetry.get("tensorboard", False) else None

    writes = BackgroundWrites()

    def on_round(server_round: int, arrays: ArrayRecord, record: dict[str, Any]) -> None:
        writes.wait()  # the previous round's model files are complete before this round's line
        record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": time.time() - started}
        outputs.append_round(record)  # first the line, then the checkpoint: see server/resume.py
        pause_point("recorded", server_round)
        extra = {"bn_stats": spec.bn_stats, "algorithm": str(cfg.algorithm.name)}
        site_models = (dict(strategy.site_models), dict(strategy.site_nodes)) if strategy.site_models else None

        def write_model_files() -> None:
            state = arrays.to_torch_state_dict()  # one conversion for both files
            outputs.save_checkpoint(state, server_round, spec.model, extra)
            outputs.save_model(state, server_round, spec, str(cfg.algorithm.name), record.get("evaluate"))
            if site_models is not None:
                outputs.save_site_models(*site_models, server_round, spec.model, extra)

        writes.submit(write_model_files)  # beside the next round's messages (server/background.py)
        if record.get("evaluate"):  # the plot and the report too (0.3 s with matplotlib), after the files
            history = list(outputs.rounds)
            writes.submit(lambda: (plot_site_metrics(history, outputs.folder / PLOT_FILE, title=f"{cfg.algorithm.name}"),
                                   write_report(outputs.folder)))
        gauges.record_round(record)
        if scalars is not None:
            scalars.record_round(record)

    # source-only ranking of held-out sites under bn_stats=local: the training sites send their running statistics
    share_bn = bool(settings.held_out) and SOURCE_ONLY in settings.unseen_protocols and spec.bn_stats == "local"
    site_config = ConfigRecord({**spec.to_flat(), RUN_TAG_KEY: outputs.folder.name, SHARE_BN_KEY: share_bn,
                                RUN_FOLDER_KEY: str(outputs.folder), ALGORITHM_KEY: str(cfg.algorithm.name),
                                TRANSPORT_DTYPE_KEY: transport_spec(cfg).dtype, **compression_spec(cfg).to_config()})
    runner = FederationRunner(grid, strategy, settings, site_config, on_round)
    strategy.restore_site_models(point.site_models, point.site_nodes)
    restore_history(strategy, outputs.rounds)
    arrays = point.arrays if point.arrays is not None else initial_arrays(cfg)
    strategy.restore_global(arrays, outputs.rounds)
    runner.run(arrays, first_round=point.next_round, start_evaluated=any(r["round"] == 0 for r in point.rounds))
    writes.wait()
    if scalars is not None:
        scalars.close()
    table = outputs.write_table(site_facts(outputs.rounds))
    report = write_report(outputs.folder)
    log(INFO, "\n%s", table)
    log(INFO, "run finished in %.0f s; results, %s, %s and %s are in %s", time.time() - started, MODEL_FILE,
        PLOT_FILE, report.name, outputs.folder)
