"""Who a reply is from: the name a node's key was registered under, never only what the reply says.

In an authenticated deployment every SuperNode's key was registered with a site name
(`fedreid-certs register` -> `flwr supernode register --name`), and the SuperLink reports it per
node (``NodeInfo.name``). That name is the site's identity in results, weights and clustering; a
reply that reports another name is logged and counted under its registered one. Without
registered names (simulation, ``--insecure`` trials) the self-reported name is used.

One name belongs to one node. Two nodes registered under the same name, or two replies in one
round reporting the same unregistered name, are an error: every such reply is rejected and
logged, since the server cannot tell which of them is the real site.
"""

from __future__ import annotations

from collections import defaultdict
from logging import WARNING
from typing import Iterable, Protocol

from flwr.app import Message
from flwr.supercore import log

from strategies.validation import SITE_KEY


class NodeDescription(Protocol):
    node_id: int
    name: str


def reported_name(message: Message) -> str | None:
    """The name the reply itself carries, if any."""
    if message.has_error() or SITE_KEY not in message.content.config_records:
        return None
    name = message.content.config_records[SITE_KEY].get("name")
    return None if name in (None, "") else str(name)


class SiteNames:
    """Node id -> site name, from registrations when there are any, else from the replies."""

    def __init__(self) -> None:
        self.registered: dict[int, str] = {}
        self.learnt: dict[int, str] = {}  # last name each node answered under (for failed sites)
        self._warned: set[tuple[int, str]] = set()

    def learn_registrations(self, nodes: Iterable[NodeDescription]) -> None:
        """Take the names the SuperLink holds for its nodes (empty names are ignored)."""
        for node in nodes:
            if getattr(node, "name", ""):
                self.registered[int(node.node_id)] = str(node.name)

    def known_nodes(self) -> list[int]:
        """Every node seen so far, registered or answering."""
        return sorted(set(self.registered) | set(self.learnt))

    def of_node(self, node: int) -> str:
        return self.registered.get(node) or self.learnt.get(node) or f"node-{node}"

    def of(self, message: Message) -> str:
        """The name results use for this reply."""
        node = message.metadata.src_node_id
        reported = reported_name(message)
        if node in self.registered:
            name = self.registered[node]
            if reported is not None and reported != name and (node, reported) not in self._warned:
                self._warned.add((node, reported))
                log(WARNING, "node %s is registered as %r but reports the name %r; it is counted as %r",
                    node, name, reported, name)
            return name
        return reported if reported is not None else f"node-{node}"

    def resolve(self, replies: Iterable[Message]) -> tuple[list[tuple[str, Message]], dict[str, str]]:
        """(name, reply) for every reply whose name is its own, and {name: reason} for names two
        nodes claim (all of their replies are turned away and logged)."""
        by_name: dict[str, list[Message]] = defaultdict(list)
        for message in replies:
            by_name[self.of(message)].append(message)
        accepted, rejected = [], {}
        for name, messages in by_name.items():
            nodes = sorted({m.metadata.src_node_id for m in messages})
            holders = sorted(n for n, registered in self.registered.items() if registered == name)
            if len(nodes) > 1 or len(holders) > 1:
                claimants = ", ".join(map(str, sorted(set(nodes) | set(holders))))
                rejected[name] = (f"the site name {name!r} is claimed by more than one node ({claimants}); "
                                  "every reply under it is turned away until only one node holds it")
                log(WARNING, "rejected %d repl%s under %r: %s", len(messages), "y" if len(messages) == 1 else "ies",
                    name, rejected[name])
                continue
            self.learnt[nodes[0]] = name
            accepted.extend((name, m) for m in messages)
        return accepted, rejected
