"""The style bank of cross-client style sharing (the feddg presets): the server keeps each site's
latest shared style statistics and sends every site the others' with its training message.

A mixin of the FedPav strategy; a site's style is a [cameras, D] array of numbers, one row per
camera (strategies/validation.py checks them), never an image; the bank a site receives is the
other sites' rows stacked, without their names.
"""

from __future__ import annotations

from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore import log

from strategies.validation import STYLE_BANK_KEY, reply_style

if TYPE_CHECKING:
    from strategies.naming import SiteNames
    from strategies.replies import Upload


class StyleBank:
    """Each site's latest style in; every site's training message out with the others' styles."""

    share_styles: bool
    styles: dict[str, np.ndarray]
    names: "SiteNames"

    def with_style_banks(self, messages: list[Message]) -> list[Message]:
        """With style sharing, each training message also carries the other sites' latest styles
        (anonymous camera rows, the receiving site's own left out)."""
        if not self.share_styles or not self.styles:
            return messages
        out = []
        for message in messages:
            site = self.names.of_node(message.metadata.dst_node_id)
            others = [self.styles[name] for name in sorted(self.styles) if name != site]
            if others:
                content = RecordDict({**dict(message.content.items()),
                                      STYLE_BANK_KEY: ArrayRecord({STYLE_BANK_KEY: Array(np.concatenate(others))})})
                message = Message(content=content, dst_node_id=message.metadata.dst_node_id,
                                  message_type=message.metadata.message_type)
            out.append(message)
        return out

    def keep_styles(self, uploads: list["Upload"]) -> None:
        """Take each accepted upload's style into the bank; a malformed one (or one of another width
        than the bank's) is left out with a warning, the update itself still counts."""
        for upload in uploads:
            style, reason = reply_style(upload.message)
            width = next(iter(self.styles.values())).shape[1] if self.styles else None
            if style is not None and width is not None and style.shape[1] != width:
                reason = f"its style rows have width {style.shape[1]}, the bank's {width}"
            if reason:
                log(WARNING, "style of %s (node %s) left out of the bank: %s", upload.site, upload.node, reason)
            elif style is not None:
                self.styles[upload.site] = style.astype(np.float32)
