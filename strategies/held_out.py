"""Held-out sites: camera sites that never train, on which every evaluation ranks the global model.

The server learns which node is which site from registered names (deployment) or by asking unnamed
nodes (a ``query`` message answered with the name only), samples only the others for training and
evaluation, and after every evaluated round sends each held-out site the global model (under
``singletons`` clustering, i.e. ``local``, every training site's own model): with the next round's
training messages when that round's training carries the sites' evaluation too, otherwise in an
exchange of its own (server/rounds.py). A mixin of the FedPav strategy: it uses the strategy's
names, transfer and site models.

Two protocols, reported apart and never mixed (``unseen`` in metrics.jsonl is keyed by them):

* ``source-only``, as the FedDG-ReID papers rank: the held-out site sees no image of its own before
  ranking. Its BatchNorm statistics come from the federation: under ``bn_stats=local`` the training
  sites' running statistics, which they send with their updates while the run has held-out sites,
  averaged with the same example counts as FedAvg (a site's own model: its own statistics); under
  ``bn_stats=average`` the global model's, which already are that average.
* ``target-adapted``, as an operator adding a camera would: AdaBN on the held-out site's own
  unlabelled training images first.
"""

from __future__ import annotations

from logging import WARNING
from typing import TYPE_CHECKING, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flwr.supercore import log

from strategies.replies import EVAL_METRICS, checked_metrics, metric_dict, screen
from strategies.validation import (BN_STATS_KEY, METRICS_KEY, SOURCE_ONLY, TARGET_ADAPTED, UNSEEN_PROTOCOL_KEY,
                                   check_evaluate_reply, reply_bn_stats)

if TYPE_CHECKING:
    from strategies.naming import SiteNames
    from strategies.replies import Upload
    from strategies.transfer import ModelTransfer

Request = tuple[Message, str, str]  # (evaluate message, the model it carries, the protocol)


class HeldOutSites:
    """Which nodes train, and the ``unseen`` evaluation of the held-out ones."""

    held_out: frozenset[str]
    names: "SiteNames"
    transfer: "ModelTransfer"
    site_models: dict[str, ArrayRecord]
    configrecord_key: str
    arrayrecord_key: str
    unseen_protocols: tuple[str, ...]
    bn_stats_by_site: dict[str, tuple[dict[str, np.ndarray], float]]  # site -> (running stats, its examples)

    def singletons(self) -> bool:
        """Whether every site trains alone (``local``), so that each has a model of its own."""
        raise NotImplementedError

    def training_sites(self, nodes: Iterable[int]) -> list[int]:
        """The nodes that may train and be evaluated as training sites: all of them, or with held-out
        sites those known by a name that is not held out (an unnamed node trains only once it has
        answered the query for its name)."""
        nodes = sorted(nodes)
        if not self.held_out:
            return nodes
        known = set(self.names.known_nodes())
        return [n for n in nodes if n in known and self.names.of_node(n) not in self.held_out]

    def unnamed(self, nodes: Iterable[int]) -> list[int]:
        """Connected nodes whose site name the server does not know yet (asked only with held-out sites)."""
        known = set(self.names.known_nodes())
        return sorted(n for n in nodes if n not in known) if self.held_out else []

    def configure_query(self, nodes: Iterable[int]) -> list[Message]:
        """A query for each node's site name: its reply holds the name and nothing else."""
        return [Message(content=RecordDict({self.configrecord_key: ConfigRecord({"ask": "site-name"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]

    def learn_names(self, replies: Iterable[Message]) -> None:
        """Remember under which name each node answered the query (registered names take precedence)."""
        self.names.resolve([r for r in replies if not r.has_error()])

    def keep_bn_stats(self, uploads: Iterable["Upload"], weight_key: str) -> None:
        """Keep each accepted update's BatchNorm running statistics (sent while the run ranks held-out
        sites source-only under ``bn_stats=local``); malformed ones are left out with a warning."""
        for upload in uploads:
            stats, reason = reply_bn_stats(upload.message)
            known = next((kept for site, (kept, _) in self.bn_stats_by_site.items() if site != upload.site), None)
            if stats is not None and known is not None and {k: v.shape for k, v in stats.items()} != \
                    {k: v.shape for k, v in known.items()}:
                reason = "its tensors are not the other sites' (names or shapes)"
            if reason:
                log(WARNING, "BatchNorm statistics of %s (node %s) left out: %s", upload.site, upload.node, reason)
            elif stats is not None:
                self.bn_stats_by_site[upload.site] = (stats, float(metric_dict(upload.message).get(weight_key, 1.0)))

    def federation_bn_stats(self, label: str) -> dict[str, np.ndarray] | None:
        """The BatchNorm statistics a source-only ranking of model ``label`` uses: a site's own, or for
        the global model the example-weighted average over the training sites (None: none known)."""
        if label != "global":
            kept = self.bn_stats_by_site.get(label)
            return dict(kept[0]) if kept else None
        kept = list(self.bn_stats_by_site.values())
        keys = set(kept[0][0]) if kept else set()
        if not kept or any(set(stats) != keys for stats, _ in kept):
            return None
        total = sum(weight for _, weight in kept)
        return {key: (sum(stats[key].astype(np.float64) * weight for stats, weight in kept) / total).astype(np.float32)
                for key in sorted(keys)}

    def configure_unseen(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> list[Request]:
        """(evaluate message, which model it carries, protocol) for every connected held-out site and
        protocol: the global model, or under ``singletons`` clustering (``local``) each training
        site's own model. A source-only request whose model has no federation BatchNorm statistics
        yet (``bn_stats=local`` before any update) is left out, with a line in the log."""
        nodes = [n for n in sorted(grid.get_node_ids()) if self.names.of_node(n) in self.held_out]
        models = sorted(self.site_models.items()) if self.singletons() and self.site_models else [("global", arrays)]
        local_stats = config.get("bn_stats", "local") == "local"
        out: list[Request] = []
        missing = []
        for label, model in models:
            for protocol in self.unseen_protocols:
                content = {self.arrayrecord_key: self.transfer.whole(model),
                           self.configrecord_key: ConfigRecord({**dict(config.items()), "server-round": server_round,
                                                                UNSEEN_PROTOCOL_KEY: protocol})}
                if protocol == SOURCE_ONLY and local_stats:
                    stats = self.federation_bn_stats(label)
                    if stats is None:
                        missing.append(label)
                        continue
                    content[BN_STATS_KEY] = ArrayRecord({k: Array(v) for k, v in stats.items()})
                out += [(Message(content=RecordDict(content), dst_node_id=node, message_type=MessageType.EVALUATE),
                         label, protocol) for node in nodes]
        if missing and nodes:
            log(WARNING, "round %d: no source-only ranking of %s yet: no training site has sent BatchNorm statistics",
                server_round, ", ".join(sorted(set(missing))))
        return out

    def aggregate_unseen(self, replies: Iterable[Message],
                         requests: dict[str, tuple[str, str]]) -> dict[str, object] | None:
        """Per protocol and held-out site its Rank-k/mAP with the model that ranks best there
        (``model``: which one), each model's mAP when there were several, and the mean over the
        held-out sites: ``{"source-only": {"sites", "mean"}, "target-adapted": {...}, "rejected"}``.
        ``requests``: message id -> (the model its request carried, the protocol)."""
        named, rejected = self.names.resolve(replies)
        accepted, malformed = screen(named, lambda m: checked_metrics(m, METRICS_KEY, check_evaluate_reply))
        rejected.update(malformed)
        by_protocol: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for name, message, metrics in accepted:
            label, protocol = requests.get(message.metadata.reply_to_message_id, ("global", TARGET_ADAPTED))
            by_protocol.setdefault(protocol, {}).setdefault(name, {})[label] = {
                k: float(v) for k, v in metrics.items() if not isinstance(v, list)}  # type: ignore[union-attr]
        if not by_protocol:
            return {"rejected": rejected} if rejected else None
        out: dict[str, object] = {"rejected": rejected}
        for protocol, by_site in sorted(by_protocol.items()):
            sites = {}
            for name, results in sorted(by_site.items()):
                best = max(sorted(results), key=lambda label: results[label]["mAP"])
                sites[name] = {**results[best], "model": best}
                if len(results) > 1:
                    sites[name]["mAP-by-model"] = {label: r["mAP"] for label, r in sorted(results.items())}
            out[protocol] = {"sites": sites, "mean": {k: float(np.mean([m[k] for m in sites.values()]))
                                                      for k in EVAL_METRICS}}
        return out


def unseen_results(unseen: dict[str, object] | None, protocol: str) -> dict[str, object]:
    """``{"sites", "mean"}`` of one protocol from an ``unseen`` record; a record written before the
    protocols were told apart (sites and mean at its top) was target-adapted."""
    unseen = unseen or {}
    if protocol in unseen:
        return unseen[protocol]  # type: ignore[return-value]
    if "sites" in unseen and protocol == TARGET_ADAPTED:
        return {"sites": unseen["sites"], "mean": unseen.get("mean")}
    return {"sites": {}, "mean": None}
