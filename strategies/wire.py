"""Bytes a message really occupies on the wire, measured from its serialised form.

Flower ships a Message as a tree of content-addressed objects (message, records, arrays, chunks);
the sum of their serialised sizes is what crosses the network, minus transport framing.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_wire_bytes(message: Message) -> int:
    """Sum of the serialised sizes of every object the message is split into."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
