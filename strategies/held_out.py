"""Held-out sites: camera sites that never train, on which every evaluation ranks the global model.

The server learns which node is which site from registered names (deployment) or by asking unnamed
nodes (a ``query`` message answered with the name only), samples only the others for training and
evaluation, and after every evaluated round sends each held-out site the global model (under
``singletons`` clustering, i.e. ``local``, every training site's own model) in an exchange of its
own. A mixin of the FedPav strategy: it uses the strategy's names, transfer and site models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies.replies import EVAL_METRICS, checked_metrics, screen
from strategies.validation import METRICS_KEY, check_evaluate_reply

if TYPE_CHECKING:
    from strategies.naming import SiteNames
    from strategies.transfer import ModelTransfer


class HeldOutSites:
    """Which nodes train, and the ``unseen`` evaluation of the held-out ones."""

    held_out: frozenset[str]
    names: "SiteNames"
    transfer: "ModelTransfer"
    site_models: dict[str, ArrayRecord]
    configrecord_key: str
    arrayrecord_key: str

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

    def configure_unseen(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> list[tuple[Message, str]]:
        """(evaluate message, which model it carries) for every connected held-out site: the global
        model, or under ``singletons`` clustering (``local``) each training site's own model."""
        nodes = [n for n in sorted(grid.get_node_ids()) if self.names.of_node(n) in self.held_out]
        models = sorted(self.site_models.items()) if self.singletons() and self.site_models else [("global", arrays)]
        config["server-round"] = server_round
        out = []
        for label, model in models:
            record = RecordDict({self.arrayrecord_key: self.transfer.whole(model), self.configrecord_key: config})
            out += [(Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE), label)
                    for node in nodes]
        return out

    def aggregate_unseen(self, replies: Iterable[Message], labels: dict[str, str]) -> dict[str, object] | None:
        """Per held-out site its Rank-k/mAP with the model that ranks best there (``model``: which one),
        each model's mAP when there were several, and the mean over the held-out sites.
        ``labels``: message id -> the model its request carried."""
        named, rejected = self.names.resolve(replies)
        accepted, malformed = screen(named, lambda m: checked_metrics(m, METRICS_KEY, check_evaluate_reply))
        rejected.update(malformed)
        by_site: dict[str, dict[str, dict[str, float]]] = {}
        for name, message, metrics in accepted:
            label = labels.get(message.metadata.reply_to_message_id, "global")
            by_site.setdefault(name, {})[label] = {k: float(v) for k, v in metrics.items()  # type: ignore[union-attr]
                                                   if not isinstance(v, list)}
        if not by_site:
            return {"sites": {}, "mean": None, "rejected": rejected} if rejected else None
        sites = {}
        for name, results in sorted(by_site.items()):
            best = max(sorted(results), key=lambda label: results[label]["mAP"])
            sites[name] = {**results[best], "model": best}
            if len(results) > 1:
                sites[name]["mAP-by-model"] = {label: r["mAP"] for label, r in sorted(results.items())}
        mean = {k: float(np.mean([m[k] for m in sites.values()])) for k in EVAL_METRICS}
        return {"sites": sites, "mean": mean, "rejected": rejected}
