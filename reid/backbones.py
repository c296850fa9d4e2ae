"""Backbones by name: torchvision classification models, the quick ``resnet10``, and your own.

ReIDNet needs three things from a backbone: the network itself (its parameters travel with the
SHARED state under ``backbone.*``), a way from images to the last spatial feature map (what RAF
distils) and a way from that map to one vector per image (what the 512-d bottleneck projects).
``Backbone`` holds those three; adapters below derive them from the classification model's own
layers, by model class, so any torchvision model of a supported family works by name
(``resnet101``, ``convnext_tiny``, ``efficientnet_b3``, ``swin_t``, ``vit_b_16`` ...). The
classification head is dropped; nothing else changes, so torchvision's ImageNet weights load by
name and the SHARED/LOCAL rule (classifier LOCAL, everything else SHARED) needs no per-model list.

Your own network: ``register_backbone("tiny", factory)`` with a factory returning an ``nn.Module``
that maps [B, 3, H, W] images to a [B, C, h, w] feature map or a [B, D] vector. Every process
that builds the model must know the factory: put it in an importable module and name it in
``model.backbone_factory=package.module:function``, or let ``fedreid.simulate`` ship it to the
simulation's workers (``save_factory``).
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

BY_REFERENCE = ("reid", "torch", "torchvision")  # modules every process imports by name
Stage = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Factory = Callable[[], nn.Module]

# Checked by tests/test_backbones.py: each builds, with the bottleneck and SHARED/LOCAL split derived.
SUPPORTED_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2",
                         "convnext_tiny", "efficientnet_b0", "efficientnet_b3", "mobilenet_v3_large",
                         "regnet_y_400mf", "densenet121", "swin_t", "vit_b_16")


@dataclass(frozen=True)
class Backbone:
    """A network, how to get its last feature map [B, C, h, w], how to pool that map to [B, dim]."""

    module: nn.Module
    feature_map: Stage
    pool: Stage
    dim: int


def _global_average(_: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)


def _resnet_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _features_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.features(x)


def _densenet_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.relu(net.features(x))


def _convnext_pool(net: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    return net.classifier[1](net.classifier[0](net.avgpool(fmap)))  # LayerNorm2d, Flatten, as torchvision does


def _regnet_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.trunk_output(net.stem(x))


def _swin_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.permute(net.norm(net.features(x)))  # [B, h, w, C] -> [B, C, h, w]


def _vit_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token after the encoder, as a 1x1 map: ViT's own image summary."""
    tokens = net._process_input(x)
    tokens = torch.cat([net.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return net.encoder(tokens)[:, 0, :, None, None]


def _first_linear(head: nn.Module) -> nn.Linear:
    return next(m for m in ([head] if isinstance(head, nn.Linear) else head.modules()) if isinstance(m, nn.Linear))


def _adapt_torchvision(net: nn.Module, name: str) -> Backbone:
    """Drop the classification head of a torchvision model and say how to drive what remains."""
    if isinstance(net, ResNet):
        dim, net.fc = net.fc.in_features, nn.Identity()
        return Backbone(net, _resnet_map, _global_average, dim)
    if isinstance(net, tvm.ConvNeXt):
        dim, net.classifier[2] = net.classifier[2].in_features, nn.Identity()
        return Backbone(net, _features_map, _convnext_pool, dim)
    if isinstance(net, (tvm.EfficientNet, tvm.MobileNetV2, tvm.MobileNetV3)):
        dim, net.classifier = _first_linear(net.classifier).in_features, nn.Identity()
        return Backbone(net, _features_map, _global_average, dim)
    if isinstance(net, tvm.DenseNet):
        dim, net.classifier = net.classifier.in_features, nn.Identity()
        return Backbone(net, _densenet_map, _global_average, dim)
    if isinstance(net, tvm.RegNet):
        dim, net.fc = net.fc.in_features, nn.Identity()
        return Backbone(net, _regnet_map, _global_average, dim)
    if isinstance(net, tvm.SwinTransformer):
        dim, net.head = net.head.in_features, nn.Identity()
        return Backbone(net, _swin_map, _global_average, dim)
    if isinstance(net, tvm.VisionTransformer):
        dim, net.heads = net.hidden_dim, nn.Identity()
        return Backbone(net, _vit_map, _global_average, dim)
    raise ValueError(f"torchvision model {name!r} ({type(net).__name__}) has no adapter")  # check_backbone's job


def set_last_stride(net: nn.Module, stride: int) -> None:
    """Stride of a ResNet's layer4 first block (1 doubles the final feature map, as in BoT).
    Other families keep their own strides."""
    if not isinstance(net, ResNet):
        return
    block = net.layer4[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides conv2
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


# torchvision's model modules whose classes _adapt_torchvision knows
FAMILIES = {"resnet": "ResNet", "convnext": "ConvNeXt", "efficientnet": "EfficientNet", "mobilenetv2": "MobileNet",
            "mobilenetv3": "MobileNet", "densenet": "DenseNet", "regnet": "RegNet", "swin_transformer": "Swin",
            "vision_transformer": "ViT"}


def check_backbone(name: str, factory: str = "") -> None:
    """Refuse a backbone name that nothing here can build, without building it (a pre-flight check)."""
    if factory or name in _REGISTRY or name == "resnet10":
        return
    if name not in tvm.list_models(module=tvm):
        raise ValueError(f"unknown backbone {name!r}: not resnet10, not a registered backbone and not a torchvision "
                         f"classification model (supported families include {', '.join(SUPPORTED_TORCHVISION)}); "
                         f"for your own network see reid.backbones.register_backbone or model.backbone_factory")
    family = tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    if family not in FAMILIES:
        raise ValueError(f"torchvision model {name!r} ({family}) is not in a supported family "
                         f"({', '.join(sorted(set(FAMILIES.values())))}); wrap it as your own backbone with "
                         f"reid.backbones.register_backbone")


def _torchvision(name: str, height: int, width: int) -> Backbone:
    check_backbone(name)
    kwargs = {}
    if name.startswith("vit_"):
        if height != width:
            raise ValueError(f"{name} takes square images: set model.height and model.width to the same size "
                             f"(224 for its ImageNet weights), got {height}x{width}")
        kwargs["image_size"] = height
    return _adapt_torchvision(tvm.get_model(name, weights=None, **kwargs), name)


def _resnet10() -> ResNet:
    """torchvision's ResNet with one BasicBlock per stage: a quick CPU backbone for tests and demos."""
    return ResNet(BasicBlock, [1, 1, 1, 1])


@dataclass(frozen=True)
class _Registered:
    factory: Factory
    dim: int | None


_REGISTRY: dict[str, _Registered] = {}


def register_backbone(name: str, factory: Factory | None = None, *,
                      feature_dim: int | None = None) -> Factory | Callable[[Factory], Factory]:
    """Make ``model.backbone=name`` build ``factory()``: an ``nn.Module`` from [B, 3, H, W] images to a
    [B, C, h, w] feature map (pooled by global averaging) or to [B, D] vectors. ``feature_dim`` (C or
    D) is found by one forward pass when not given. Usable as a decorator: ``@register_backbone("x")``."""
    def add(fn: Factory) -> Factory:
        if name == "resnet10" or name in tvm.list_models(module=tvm):
            raise ValueError(f"{name!r} is a built-in backbone; register yours under another name")
        _REGISTRY[name] = _Registered(fn, feature_dim)
        return fn
    return add(factory) if factory is not None else add


def registered_factory(name: str) -> Factory | None:
    """The factory registered under ``name`` in this process, if any."""
    entry = _REGISTRY.get(name)
    return entry.factory if entry else None


def save_factory(name: str, path: Path) -> Path:
    """Write the factory registered as ``name`` to ``path`` (cloudpickle, by value, so a factory
    written in a notebook cell also loads in another process). For simulations on this machine:
    deployed sites import ``package.module:function`` instead."""
    from ray import cloudpickle  # the simulation engine's own serialiser; only simulations need this

    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"no backbone registered as {name!r}; call register_backbone({name!r}, factory) first")
    module_name = entry.factory.__module__
    by_value = module_name and module_name != "__main__" and not module_name.startswith(BY_REFERENCE)
    module = importlib.import_module(module_name) if by_value else None
    if module is not None:
        cloudpickle.register_pickle_by_value(module)  # the simulation's workers may not import it
    try:
        payload = cloudpickle.dumps(entry)
    finally:
        if module is not None:
            cloudpickle.unregister_pickle_by_value(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def module_allowed(module: str, allowed: frozenset[str] | set[str]) -> bool:
    """Whether ``module`` is one of ``allowed`` or inside one of those packages (``a`` allows ``a.b``)."""
    return any(module == name or module.startswith(f"{name}.") for name in allowed)


def _load_factory(name: str, source: str) -> None:
    """Register ``name`` from ``model.backbone_factory``: ``package.module:function`` or a saved file."""
    if source.endswith(".pkl"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"backbone factory file {path} not found (written by fedreid.simulate for "
                                    f"backbone {name!r}); on a deployed site use model.backbone_factory=module:function")
        entry = pickle.loads(path.read_bytes())  # noqa: S301 - the researcher's own file, written by save_factory
        _REGISTRY[name] = entry
        return
    module_name, _, attribute = source.partition(":")
    if not attribute:
        raise ValueError(f"model.backbone_factory must be 'package.module:function' or a .pkl file, got {source!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import backbone factory {source!r} for backbone {name!r}: {error}; the module "
                         f"must be importable on the server and on every site") from error
    _REGISTRY[name] = _Registered(factory, None)


def _dims_of(module: nn.Module, height: int, width: int) -> tuple[int, bool]:
    """(channels or width of the output, whether it is a spatial map), from one forward pass."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(2, 3, height, width))
    module.train(was_training)
    if out.dim() not in (2, 4):
        raise ValueError(f"a backbone must return [B, C, h, w] or [B, D]; this one returns shape {tuple(out.shape)}")
    return out.shape[1], out.dim() == 4


def _custom(name: str, entry: _Registered, height: int, width: int) -> Backbone:
    module = entry.factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory of backbone {name!r} returned {type(module).__name__}, not an nn.Module")
    dim, spatial = _dims_of(module, height, width)
    if entry.dim is not None and entry.dim != dim:
        raise ValueError(f"backbone {name!r} was registered with feature_dim={entry.dim} but outputs {dim}")
    if spatial:
        return Backbone(module, lambda net, x: net(x), _global_average, dim)
    return Backbone(module, lambda net, x: net(x)[:, :, None, None], _global_average, dim)


def build_backbone(name: str, height: int, width: int, factory: str = "") -> Backbone:
    """The backbone called ``name`` for [height x width] inputs: registered (or loaded from
    ``factory``), ``resnet10``, or a torchvision classification model."""
    if factory and name not in _REGISTRY:
        _load_factory(name, factory)
    if name in _REGISTRY:
        return _custom(name, _REGISTRY[name], height, width)
    if name == "resnet10":
        return _adapt_torchvision(_resnet10(), name)
    return _torchvision(name, height, width)
