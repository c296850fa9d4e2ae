"""ReIDNet: backbone (reid.backbones) -> 512-d bottleneck -> per-site identity classifier.

The module also declares the one rule that decides which state keys travel between a site and
the server (SHARED) and which never leave the site (LOCAL): the identity classifier is LOCAL,
because each site has its own identities; BatchNorm running statistics are SHARED or LOCAL by
policy; ``num_batches_tracked`` counters are bookkeeping and stay LOCAL.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.hub import load_state_dict_from_url
from torchvision import models as tvm

from reid.backbones import build_backbone, set_last_stride

log = logging.getLogger(__name__)

CLASSIFIER_PREFIX = "classifier."
BN_STATS_SUFFIXES = ("running_mean", "running_var")
BN_COUNTER_SUFFIX = "num_batches_tracked"
BN_STATS_POLICIES = ("average", "local")
IMAGENET = "imagenet"  # model.pretrained=imagenet: torchvision's weights by name


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same network on the server and on every site."""

    backbone: str = "resnet50"
    last_stride: int = 2
    bottleneck_dim: int = 512
    dropout: float = 0.5
    height: int = 256
    width: int = 128
    backbone_factory: str = ""  # your own backbone: "package.module:function" (see reid.backbones)


class ReIDNet(nn.Module):
    """Backbone -> global average pool -> Linear+BN1d+Dropout bottleneck -> optional classifier."""

    def __init__(self, spec: ModelSpec, num_classes: int = 0) -> None:
        super().__init__()
        built = build_backbone(spec.backbone, spec.height, spec.width, spec.backbone_factory or "")
        self.spec = spec
        self.backbone = built.module
        self._feature_map, self._pool = built.feature_map, built.pool
        set_last_stride(self.backbone, spec.last_stride)
        self.bottleneck = nn.Sequential(
            nn.Linear(built.dim, spec.bottleneck_dim),
            nn.BatchNorm1d(spec.bottleneck_dim),
            nn.Dropout(spec.dropout),
        )
        nn.init.kaiming_normal_(self.bottleneck[0].weight, a=0, mode="fan_out")
        nn.init.zeros_(self.bottleneck[0].bias)
        nn.init.normal_(self.bottleneck[1].weight, 1.0, 0.02)
        nn.init.zeros_(self.bottleneck[1].bias)
        self.classifier: nn.Module | None = None
        if num_classes > 0:
            self.classifier = self.make_classifier(spec.bottleneck_dim, num_classes)

    @staticmethod
    def make_classifier(dim: int, num_classes: int) -> nn.Linear:
        """A fresh identity classifier, initialised as in the reference (N(0, 0.001), zero bias)."""
        classifier = nn.Linear(dim, num_classes)
        nn.init.normal_(classifier.weight, std=0.001)
        nn.init.zeros_(classifier.bias)
        return classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d bottleneck output (after BN; dropout acts only in train mode)."""
        return self.bottleneck(self._pool(self.backbone, self.feature_map(x)))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map [B, C, h, w] (before pooling): what RAF distils."""
        return self._feature_map(self.backbone, x)

    def embedding(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Pooled, projected and batch-normalised ``feature_map``: ``features`` before dropout."""
        return self.bottleneck[1](self.bottleneck[0](self._pool(self.backbone, feature_map)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity logits when a classifier is attached, else the bottleneck feature."""
        feats = self.features(x)
        return self.classifier(feats) if self.classifier is not None else feats


def build_model(spec: ModelSpec, num_classes: int = 0, pretrained: str | Path | None = None) -> ReIDNet:
    """Build a ReIDNet; ``pretrained`` is ``"imagenet"`` (torchvision's weights, fetched once into the
    torch cache) or a local ImageNet state_dict file for the backbone."""
    model = ReIDNet(spec, num_classes)
    if pretrained:
        load_backbone_weights(model, pretrained)
    return model


class FreshModels:
    """``build_model`` without paying for the random initialisation again: a site builds its model
    afresh every round, from the same seed, only to overwrite the backbone with the received weights
    (a ResNet-10's Kaiming initialisation took 0.13 s of a round's 0.26 s of site work on a CPU).
    The first build from a given RNG state is kept (at most ``keep`` of them) and later builds from
    that state are copies of it, with the RNG left where building would have left it: parameters,
    buffers and every later random draw are bit-identical to building afresh."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._kept: OrderedDict[tuple, tuple[ReIDNet, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def build(self, spec: ModelSpec, num_classes: int = 0) -> ReIDNet:
        """What ``build_model(spec, num_classes)`` would return now (no pretrained weights: the
        received model replaces the backbone anyway)."""
        key = (spec, num_classes, hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                template, rng_after = kept
                torch.set_rng_state(rng_after)
                return copy.deepcopy(template)
        model = build_model(spec, num_classes)
        with self._lock:
            self._kept[key] = (copy.deepcopy(model), torch.get_rng_state())
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        return model


fresh_models = FreshModels()


def imagenet_state_dict(backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights for ``backbone`` and where they came from. Downloaded into
    ``$TORCH_HOME/hub/checkpoints`` the first time; read from there afterwards, with no network."""
    try:
        weights = tvm.get_model_weights(backbone).DEFAULT
    except ValueError:
        raise ValueError(f"torchvision has no ImageNet weights for backbone {backbone!r}; model.pretrained=imagenet "
                         f"needs a torchvision classification model by name (resnet50, convnext_tiny, ...)") from None
    try:
        return load_state_dict_from_url(weights.url, progress=True, check_hash=True), weights.url
    except Exception as error:  # URLError, timeouts, a hash mismatch, a full disk: all end the same way
        name = weights.url.rsplit("/", 1)[-1]
        raise RuntimeError(
            f"could not fetch ImageNet weights for {backbone} from {weights.url}: {error}. Without internet, "
            f"download that file on another machine and either put it in {torch.hub.get_dir()}/checkpoints/ "
            f"or pass its path: model.pretrained=/path/to/{name}") from error


def load_backbone_weights(model: ReIDNet, source: str | Path) -> None:
    """Load ImageNet weights into the backbone: ``"imagenet"`` by name, or a local state_dict file."""
    if str(source) == IMAGENET:
        state, source = imagenet_state_dict(model.spec.backbone)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file {path} not found; give the path of a torchvision "
                                    f"{model.spec.backbone} state_dict, or model.pretrained=imagenet to fetch it")
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = model.backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{source} does not fit backbone {model.spec.backbone}: shape mismatch at {mismatched[:3]}")
    result = model.backbone.load_state_dict(state, strict=False)
    loaded = len(own) - len(result.missing_keys)
    if loaded == 0:
        raise ValueError(f"{source} holds no weights for backbone {model.spec.backbone}")
    log.info("loaded %d/%d backbone tensors from %s", loaded, len(own), source)


def is_local_key(key: str, bn_stats: str = "average") -> bool:
    """The SHARED/LOCAL rule: True for state keys that must never leave the site."""
    if bn_stats not in BN_STATS_POLICIES:
        raise ValueError(f"bn_stats must be one of {BN_STATS_POLICIES}, got {bn_stats!r}")
    if key.startswith(CLASSIFIER_PREFIX) or key.endswith(BN_COUNTER_SUFFIX):
        return True
    return bn_stats == "local" and key.endswith(BN_STATS_SUFFIXES)


def split_state(
    state: dict[str, torch.Tensor], bn_stats: str = "average"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a state_dict into (SHARED, LOCAL) by the rule above."""
    shared = {k: v for k, v in state.items() if not is_local_key(k, bn_stats)}
    local = {k: v for k, v in state.items() if is_local_key(k, bn_stats)}
    return shared, local


def shared_state(model: ReIDNet, bn_stats: str = "average") -> dict[str, torch.Tensor]:
    """The tensors that travel, detached and on the CPU."""
    return {k: v.detach().cpu() for k, v in split_state(model.state_dict(), bn_stats)[0].items()}


def load_shared_state(model: ReIDNet, shared: dict[str, torch.Tensor], bn_stats: str = "average") -> None:
    """Load received SHARED tensors; refuse anything that is not exactly the model's SHARED key set."""
    expected = set(split_state(model.state_dict(), bn_stats)[0])
    received = set(shared)
    if received != expected:
        missing, extra = sorted(expected - received), sorted(received - expected)
        raise ValueError(f"received state does not match the SHARED keys of {model.spec.backbone}: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    model.load_state_dict(shared, strict=False)
