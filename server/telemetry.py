"""Prometheus gauges of a running federation, served by the ServerApp with prometheus-client.

Flower's open-source SuperLink exports no metrics of its own, so the ServerApp publishes what an
operator watches: the round, how many sites replied, failed (no answer in time) or were rejected
(malformed update), bytes each way, aggregation and round durations, and each site's latest
Rank-1 and mAP. The endpoint lives as long as the ServerApp process; the same gauges are also
written to ``metrics.prom`` in the run folder after every round (Prometheus text format, for a
node_exporter textfile collector or a look after the run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server, write_to_textfile

log = logging.getLogger("fedreid.telemetry")
TEXTFILE = "metrics.prom"


class FederationGauges:
    """The gauges of one run, in their own registry (no clash with other collectors in the process)."""

    def __init__(self, run_folder: Path, algorithm: str) -> None:
        self.registry = CollectorRegistry()
        self.textfile = run_folder / TEXTFILE
        labels = {"registry": self.registry}
        self.info = Gauge("fedreid_run_info", "the run being served (value 1)", ["run", "algorithm"], **labels)
        self.info.labels(run_folder.name, algorithm).set(1)
        self.round = Gauge("fedreid_round", "last completed federated round", **labels)
        self.sites = Gauge("fedreid_round_sites", "sites in the last training round, by outcome", ["outcome"],
                           **labels)
        self.bytes = Gauge("fedreid_round_bytes", "serialised bytes in the last training round", ["direction"],
                           **labels)
        self.bytes_total = Gauge("fedreid_bytes", "serialised bytes since the run started (training and "
                                 "evaluation)", ["direction"], **labels)
        self.aggregation_seconds = Gauge("fedreid_aggregation_seconds", "time to aggregate the last round",
                                         **labels)
        self.round_seconds = Gauge("fedreid_round_seconds", "wall time of the last round", **labels)
        self.rank1 = Gauge("fedreid_site_rank1", "latest Rank-1 of the global model on each site", ["site"], **labels)
        self.mean_ap = Gauge("fedreid_site_map", "latest mAP of the global model on each site", ["site"], **labels)

    def serve(self, port: int, host: str) -> None:
        """Start the HTTP endpoint (a daemon thread of this process)."""
        start_http_server(port, addr=host, registry=self.registry)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def record_round(self, record: dict[str, Any]) -> None:
        """Update every gauge from one metrics.jsonl record, then rewrite metrics.prom."""
        self.round.set(record["round"])
        train = record.get("train")
        if train:
            replied = len(train["sites"])
            self.sites.labels("replied").set(replied)
            self.sites.labels("rejected").set(len(train["rejected"]))
            self.sites.labels("failed").set(len(train.get("failed", [])))
            self.bytes.labels("down").set(train["bytes"]["sent"])
            self.bytes.labels("up").set(train["bytes"]["received"])
            self.aggregation_seconds.set(train.get("aggregation_seconds", 0.0))
        for phase in (train, record.get("evaluate")):
            if phase:
                self.bytes_total.labels("down").inc(phase["bytes"]["sent"])
                self.bytes_total.labels("up").inc(phase["bytes"]["received"])
        if "seconds" in record:
            self.round_seconds.set(record["seconds"])
        evaluation = record.get("evaluate")
        if evaluation:
            for site, metrics in evaluation["sites"].items():
                self.rank1.labels(site).set(metrics["rank1"])
                self.mean_ap.labels(site).set(metrics["mAP"])
        write_to_textfile(str(self.textfile), self.registry)
