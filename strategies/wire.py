"""Bytes a message really occupies on the wire, measured from its serialised form.

Flower ships a Message as a tree of content-addressed objects (message, records, arrays, chunks);
the sum of their serialised sizes is what crosses the network, minus transport framing.
Also how promptly a receiver asks again for objects still on their way (``pull_promptly``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from flwr.app import Array, Message
from flwr.app.message.arraychunk import ArrayChunk
from flwr.supercore.inflatable.inflatable_object import InflatableObject, add_header_to_object_body


def message_wire_bytes(message: Message) -> int:
    """Sum of the serialised sizes of every object the message is split into, each distinct object
    once (Flower's ``get_all_nested_objects``), without serialising the array chunks again: their
    size is their data's plus a header, and their ids were computed when the arrays were sliced.
    Serialising and hashing a 20 MB model's chunks once more per message cost 0.1 s a message."""
    sizes: dict[str, int] = {}
    _add_object_sizes(message, sizes)
    return sum(sizes.values())


def _add_object_sizes(obj: InflatableObject, sizes: dict[str, int]) -> None:
    children = obj.slice_array() if isinstance(obj, Array) else list((obj.children or {}).items())
    for child_id, child in children:
        if isinstance(child, ArrayChunk):
            sizes.setdefault(child_id, _chunk_size(child))
        else:
            _add_object_sizes(child, sizes)
    sizes.setdefault(obj.object_id, len(obj.deflate()))


def _chunk_size(chunk: ArrayChunk) -> int:
    """``len(chunk.deflate())``: the header Flower writes (it ends with the body's length in digits)
    for an empty body, corrected to this body's length, plus the body."""
    body = len(chunk.data)
    return len(add_header_to_object_body(b"", chunk)) - 1 + len(str(body)) + body


# Asking again for an object the other side has announced but not received yet: Flower's
# ``pull_objects`` waits 1 s (doubling to 10 s); a message is stored before its arrays, so the
# receiver is often a fraction of a second early, and that wait cost a whole second per hop.
# Across the network (a SuperNode asking its SuperLink) the wait doubles to 0.5 s; between two
# processes on one box (the site worker and its SuperNode, the ServerApp and its SuperLink) asking
# costs little, and a 0.4-s step had the worker take its input 0.5 s after the SuperNode had it.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S, LOCAL_PULL_BACKOFF_CAP_S = 0.05, 0.5, 0.1


def pull_promptly(module: ModuleType, backoff_cap_s: float = PULL_BACKOFF_CAP_S) -> None:
    """Make ``module``'s ``pull_objects`` (Flower's, imported by name there) ask again after
    ``PULL_BACKOFF_S`` doubling to ``backoff_cap_s``; a call that sets its own backoff keeps it."""
    original = getattr(module, "pull_objects", None)
    if original is None:
        raise RuntimeError(f"the installed Flower's {module.__name__} has no pull_objects; pin flwr==1.39.*")
    if getattr(original, "fedreid_prompt", False):
        return

    def pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF_S)
        kwargs.setdefault("backoff_cap", backoff_cap_s)
        return original(*args, **kwargs)

    pull_objects.fedreid_prompt = True  # type: ignore[attr-defined]
    module.pull_objects = pull_objects
