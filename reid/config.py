"""The settings a site needs to rebuild the server's model and train it, as one flat mapping.

The server composes them (Hydra) and ships them with every round; a site turns them back into the
dataclasses below. Flat ``section.field`` keys with scalar values fit any transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from reid.data.transforms import AugmentSpec
from reid.divergence import KLLConfig
from reid.models import BN_STATS_POLICIES, ModelSpec
from reid.pruning import CRRConfig, PruningConfig
from reid.raf import RAFConfig
from reid.style import StyleConfig
from reid.train import TrainConfig
from reid.unsupervised import UnsupervisedConfig

Scalar = int | float | str | bool
_UNSET = ""  # transports without None carry optional fields as an empty string


@dataclass(frozen=True)
class SiteRunSpec:
    """Model, optimisation, augmentation and policy settings, identical for every site in a round."""

    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    kll: KLLConfig = field(default_factory=KLLConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    crr: CRRConfig = field(default_factory=CRRConfig)
    unsupervised: UnsupervisedConfig = field(default_factory=UnsupervisedConfig)
    raf: RAFConfig = field(default_factory=RAFConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    bn_stats: str = "local"
    seed: int = 0
    verify_images: bool = True
    eval_batch_size: int = 128
    eval_query_scales: str = ""  # also rank the queries at these resolutions, e.g. "0.5 0.25" (resolution drift)
    # Measure how far training moved the model on a fixed probe batch (two extra forward passes a
    # round): the server asks only when its aggregation weights read it (CDW, KLPWA; server/app.py).
    measure_change: bool = True

    def __post_init__(self) -> None:
        if self.bn_stats not in BN_STATS_POLICIES:
            raise ValueError(f"bn_stats must be one of {BN_STATS_POLICIES}, got {self.bn_stats!r}")

    def to_flat(self) -> dict[str, Scalar]:
        """``{"model.backbone": "resnet50", ..., "bn_stats": "average"}``; None becomes ""."""
        flat: dict[str, Scalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECTIONS:
                for sub in fields(value):
                    item = getattr(value, sub.name)
                    flat[f"{f.name}.{sub.name}"] = _UNSET if item is None else item
            else:
                flat[f.name] = value
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "SiteRunSpec":
        """Inverse of ``to_flat``; ignores keys it does not know (e.g. the server round)."""
        sections: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            kwargs = {}
            for sub in fields(section_cls):
                key = f"{name}.{sub.name}"
                if key in flat:
                    kwargs[sub.name] = None if flat[key] == _UNSET else flat[key]
            sections[name] = section_cls(**kwargs)
        top = {f.name: flat[f.name] for f in fields(cls) if f.name not in _SECTIONS and f.name in flat}
        return cls(**sections, **top)


_SECTIONS: dict[str, type] = {"model": ModelSpec, "train": TrainConfig, "augment": AugmentSpec, "kll": KLLConfig,
                              "pruning": PruningConfig, "crr": CRRConfig, "unsupervised": UnsupervisedConfig,
                              "raf": RAFConfig, "style": StyleConfig}
