"""How models travel between the server and each site, in both directions, as one composable part.

``ModelTransfer`` is what every strategy uses by default: the server sends the whole model (pruned
tensors in the sparse encoding when the global model is pruned and ``sparse_downlink`` is on,
packed into one flat array in the transport precision), and a reply carries the site's whole
SHARED state in the same forms.

``CompressedTransfer`` (beyond the papers) sends changes instead (strategies/update_codec.py):

* down: the global model's change since the model the site holds, quantised. The server keeps
  that model, exactly as the site rebuilt it, per version; sites that received the same
  messages share one version. A site that missed a round (no reply), answered with an error, or
  joins late gets the whole model and starts a new version. The round config names the version
  a change is from (``update-base``) and the version the site holds afterwards (``update-version``).
  What quantisation leaves out stays in the difference between the global model and that copy,
  so it travels in a later round (error feedback on the way down).
* up: the site's change from the model it received, quantised with its own error feedback
  (clients/site.py); the server rebuilds the upload on its copy of what it sent that site. A
  kept position without a coded value is "no change", so it averages as the received value.

Both check a reply as strictly as the other: every decoding problem is a reason to reject it.
Evaluation requests to a training site with a known version are changes too (the site does not
keep them); held-out sites always get whole models.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord

from strategies.ndarrays import values_of
from strategies.packing import TransportSpec, pack_record, unpack_record
from strategies.sparse_records import Tensor, decode_record, encode_record
from strategies.update_codec import CompressionSpec, UpdateFormatError, decode_record_change, encode_record_change

UPDATE_BASE_KEY = "update-base"  # round config: the version of the model this message's change is from
UPDATE_VERSION_KEY = "update-version"  # round config: the version the site holds once it has applied it

Masks = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Outgoing:
    """A model in its travelling form, the round-config entries that go with it, and what the site
    will hold once it has decoded it."""

    record: ArrayRecord
    config: dict[str, str] = field(default_factory=dict)
    held: dict[str, np.ndarray] | None = None


def plain_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: values_of(array) for key, array in arrays.items()}


def decode_plain(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """A whole model as a site or the server reads it (packed or not, dense or sparse-encoded)."""
    return decode_record(unpack_record(record), shapes)


class ModelTransfer:
    """Whole models both ways (see the module's docstring)."""

    def __init__(self, transport: TransportSpec | None = None, sparse_downlink: bool = False) -> None:
        self.transport = transport or TransportSpec()
        self.sparse_downlink = sparse_downlink
        self._encoded: tuple[ArrayRecord, object, ArrayRecord] | None = None  # the last (arrays, masks, form)

    def whole(self, arrays: ArrayRecord, masks: Masks | None = None) -> ArrayRecord:
        """The arrays as they travel: pruned tensors (``masks``, or with ``sparse_downlink`` any that
        hold zeros) encoded when that is smaller, then packed in the transport precision. The same
        model sent to many sites is encoded once."""
        if self._encoded is not None and self._encoded[0] is arrays and self._encoded[1] is masks:
            return self._encoded[2]
        record = arrays
        if self.sparse_downlink:
            record = encode_record(plain_arrays(arrays), dict(masks or {}), sparse_zeros=not masks)
        record = pack_record(record, self.transport.dtype) if self.transport.pack else record
        self._encoded = (arrays, masks, record)
        return record

    def outgoing(self, node: int, arrays: ArrayRecord, masks: Masks | None = None, training: bool = True) -> Outgoing:
        return Outgoing(self.whole(arrays, masks))

    def incoming(self, node: int, record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
        """A training reply's tensors from its unpacked arrays; raises SparseFormatError /
        UpdateFormatError / ValueError with the reason."""
        return decode_record(record, shapes)

    def settle(self, answered: set[int]) -> None:
        """After a training round: the nodes in ``answered`` replied without an error, the others
        sent a model this round did not."""

    def versions_held(self) -> int:
        return 0


@dataclass(frozen=True)
class Version:
    """A model as a group of sites holds it: the values and the masks of pruned tensors."""

    values: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


class CompressedTransfer(ModelTransfer):
    """Quantised changes both ways, with one server-side copy per version of the sites' models."""

    def __init__(self, compression: CompressionSpec, transport: TransportSpec | None = None,
                 sparse_downlink: bool = False) -> None:
        super().__init__(transport, sparse_downlink)
        self.compression = compression
        self.versions: dict[str, Version] = {}
        self.held: dict[int, str] = {}  # node -> the version it holds (acknowledged by a reply)
        self.pending: dict[int, str] = {}  # node -> the version it was sent this round
        self._made: dict[tuple[int, str | None], tuple[ArrayRecord, str, Version]] = {}  # this round's messages
        self._evaluation: tuple[ArrayRecord, str, ArrayRecord] | None = None  # the last evaluation change
        self._prefix = uuid.uuid4().hex[:8]  # versions of another server process never match
        self._count = 0

    def _new_version(self, version: Version) -> str:
        self._count += 1
        name = f"{self._prefix}-{self._count}"
        self.versions[name] = version
        return name

    def _pack(self, record: ArrayRecord) -> ArrayRecord:
        return pack_record(record, self.transport.dtype) if self.transport.pack else record

    def outgoing(self, node: int, arrays: ArrayRecord, masks: Masks | None = None, training: bool = True) -> Outgoing:
        base_name = self.held.get(node) if self.compression.downlink else None
        base = self.versions.get(base_name) if base_name else None
        if not training:  # an evaluation: a change the site applies without keeping it
            if base is None:
                return Outgoing(self.whole(arrays, masks))
            if self._evaluation is None or self._evaluation[0] is not arrays or self._evaluation[1] != base_name:
                change = encode_record_change(plain_arrays(arrays), base.values, self.compression, masks, base.masks)
                self._evaluation = (arrays, base_name, self._pack(change.record))
            return Outgoing(self._evaluation[2], {UPDATE_BASE_KEY: base_name})  # type: ignore[dict-item]
        key = (id(arrays), base_name if base is not None else None)
        if key not in self._made:
            shapes = {k: tuple(a.shape) for k, a in arrays.items()}
            if base is None:
                record = self.whole(arrays, masks)
                decoded = decode_plain(record, shapes)
            else:
                record = self._pack(encode_record_change(plain_arrays(arrays), base.values, self.compression, masks,
                                                         base.masks).record)
                decoded = decode_record_change(unpack_record(record), base.values, shapes, base.masks)
            version = Version({k: t.values for k, t in decoded.items()},
                              {k: t.mask for k, t in decoded.items() if t.mask is not None})
            self._made[key] = (record, self._new_version(version), version)
        record, name, version = self._made[key]
        self.pending[node] = name
        config = {UPDATE_VERSION_KEY: name, **({UPDATE_BASE_KEY: base_name} if base is not None else {})}
        return Outgoing(record, config, version.values)  # type: ignore[arg-type]

    def incoming(self, node: int, record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
        version = self.versions.get(self.pending.get(node, ""))
        if version is None:
            raise UpdateFormatError("this node was sent no model this round, so it has no change to report")
        return decode_record_change(record, version.values, shapes, version.masks)

    def settle(self, answered: set[int]) -> None:
        for node in self.pending.keys() | self.held.keys():
            if node in answered and node in self.pending:
                self.held[node] = self.pending[node]
            elif node in self.pending:  # asked, but no usable answer: it may or may not hold the new version
                self.held.pop(node, None)
        self.pending = {}
        self._made = {}
        alive = set(self.held.values())
        self.versions = {name: v for name, v in self.versions.items() if name in alive}

    def versions_held(self) -> int:
        return len(self.versions)


def build_transfer(compression: CompressionSpec | None, transport: TransportSpec | None,
                   sparse_downlink: bool) -> ModelTransfer:
    if compression is not None and compression.enabled:
        return CompressedTransfer(compression, transport, sparse_downlink)
    return ModelTransfer(transport, sparse_downlink)

