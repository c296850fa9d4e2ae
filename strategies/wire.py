"""Bytes a message really occupies on the wire, measured from its serialised form.

Flower ships a Message as a tree of content-addressed objects (message, records, arrays, chunks);
the sum of their serialised sizes is what crosses the network, minus transport framing.
Also how promptly a receiver asks again for objects still on their way (``pull_promptly``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_wire_bytes(message: Message) -> int:
    """Sum of the serialised sizes of every object the message is split into."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


# Asking again for an object the other side has announced but not received yet: Flower's
# ``pull_objects`` waits 1 s (doubling to 10 s); a message is stored before its arrays, so the
# receiver is often a fraction of a second early, and that wait cost a whole second per hop.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5


def pull_promptly(module: ModuleType) -> None:
    """Make ``module``'s ``pull_objects`` (Flower's, imported by name there) ask again after
    ``PULL_BACKOFF_S`` doubling to ``PULL_BACKOFF_CAP_S``; a call that sets its own backoff keeps it."""
    original = getattr(module, "pull_objects", None)
    if original is None:
        raise RuntimeError(f"the installed Flower's {module.__name__} has no pull_objects; pin flwr==1.39.*")
    if getattr(original, "fedreid_prompt", False):
        return

    def pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF_S)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP_S)
        return original(*args, **kwargs)

    pull_objects.fedreid_prompt = True  # type: ignore[attr-defined]
    module.pull_objects = pull_objects
