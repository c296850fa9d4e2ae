"""Backbones by name and your own: every supported torchvision model builds with the bottleneck and
the SHARED/LOCAL split derived from the model itself; a registered factory becomes a backbone."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from reid import backbones
from reid.backbones import SUPPORTED_TORCHVISION, register_backbone, save_factory
from reid.models import ModelSpec, build_model, load_shared_state, shared_state, split_state

HEADS = ("fc.", "classifier.", "head.", "heads.")  # where torchvision keeps each family's ImageNet head


def build_on_meta(name: str, **spec: object):
    """Shapes and keys without paying for weight initialisation (RegNet computes its widths with real
    tensors, so it builds on the CPU)."""
    size = {"height": 224, "width": 224} if name.startswith("vit_") else {"height": 64, "width": 32}
    device = contextlib.nullcontext() if name.startswith("regnet") else torch.device("meta")
    with device:
        model = build_model(ModelSpec(backbone=name, last_stride=1, **(size | spec)), num_classes=7)
        reference = tvm.get_model(name, weights=None, **({"image_size": 224} if name.startswith("vit_") else {}))
        images = torch.zeros(2, 3, size["height"], size["width"])
        model.eval()
        with torch.no_grad():
            outputs = model.feature_map(images), model.features(images), model(images)
    return model, reference, outputs


@pytest.mark.parametrize("name", SUPPORTED_TORCHVISION)
def test_every_supported_torchvision_backbone_builds_with_a_derived_split(name: str) -> None:
    model, reference, (feature_map, features, logits) = build_on_meta(name)
    assert feature_map.dim() == 4 and tuple(features.shape) == (2, 512) and tuple(logits.shape) == (2, 7)
    assert model.bottleneck[0].in_features == feature_map.shape[1]
    # The backbone is torchvision's model minus its head, key for key: ImageNet weights load by name.
    ours = {k.removeprefix("backbone.") for k in model.state_dict() if k.startswith("backbone.")}
    theirs = set(reference.state_dict())
    assert ours <= theirs and theirs - ours and all(k.startswith(HEADS) for k in theirs - ours), theirs - ours
    shared, local = split_state(model.state_dict(), "average")
    assert set(shared).isdisjoint(local) and set(shared) | set(local) == set(model.state_dict())
    assert {k for k in local if not k.endswith("num_batches_tracked")} == {"classifier.weight", "classifier.bias"}
    parameters = {k for k, _ in model.named_parameters() if not k.startswith("classifier.")}
    assert parameters <= set(shared)  # every trainable backbone and bottleneck tensor travels
    _, local_stats = split_state(model.state_dict(), "local")
    has_batchnorm = any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(k.startswith("backbone.") and k.endswith("running_var") for k in local_stats) == has_batchnorm


def test_families_outside_the_adapters_and_non_square_vit_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="'squeezenet1_0' .squeezenet. is not in a supported family"):
        build_model(ModelSpec(backbone="squeezenet1_0", height=64, width=32))
    with pytest.raises(ValueError, match="vit_b_16 takes square images"):
        build_model(ModelSpec(backbone="vit_b_16", height=256, width=128))


def test_imagenet_weights_of_another_family_load_from_a_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = tvm.efficientnet_b0(weights=None)
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelSpec(backbone="efficientnet_b0", height=64, width=32), pretrained=path)
    torch.testing.assert_close(model.backbone.features[0][0].weight, reference.features[0][0].weight)


class VectorNet(nn.Module):
    """A backbone that pools by itself: images -> [B, 24]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty registry for each test, so registrations do not leak between tests."""
    monkeypatch.setattr(backbones, "_REGISTRY", {})
    return backbones._REGISTRY


def test_a_registered_factory_builds_trains_and_splits_like_a_builtin(registry: dict) -> None:
    @register_backbone("mapnet")
    def mapnet() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    register_backbone("vectornet", VectorNet)
    torch.manual_seed(0)
    for name, dim in (("mapnet", 16), ("vectornet", 24)):
        model = build_model(ModelSpec(backbone=name, height=32, width=16), num_classes=3)
        assert model.bottleneck[0].in_features == dim and model.feature_map(torch.zeros(2, 3, 32, 16)).dim() == 4
        before = {k: v.clone() for k, v in shared_state(model).items()}
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 16)), torch.tensor([0, 1, 2, 0])).backward()
        optimiser.step()
        after = shared_state(model)
        assert not torch.equal(before[next(k for k in before if k.startswith("backbone."))],
                               after[next(k for k in after if k.startswith("backbone."))])
        twin = build_model(ModelSpec(backbone=name, height=32, width=16), num_classes=5)
        load_shared_state(twin, after)  # the same SHARED keys on every site, whatever its classifier
        assert set(split_state(model.state_dict())[1]) >= {"classifier.weight", "classifier.bias"}


def test_registration_mistakes_are_refused_clearly(registry: dict) -> None:
    with pytest.raises(ValueError, match="'resnet50' is a built-in backbone"):
        register_backbone("resnet50", VectorNet)
    register_backbone("liar", VectorNet, feature_dim=99)
    with pytest.raises(ValueError, match="registered with feature_dim=99 but outputs 24"):
        build_model(ModelSpec(backbone="liar", height=32, width=16))
    register_backbone("not_a_module", lambda: "conv")
    with pytest.raises(TypeError, match="returned str, not an nn.Module"):
        build_model(ModelSpec(backbone="not_a_module", height=32, width=16))
    with pytest.raises(ValueError, match="cannot import backbone factory 'no_such_module:net'"):
        build_model(ModelSpec(backbone="elsewhere", backbone_factory="no_such_module:net"))


def test_a_factory_travels_by_import_path_or_by_value(registry: dict, tmp_path: Path) -> None:
    model = build_model(ModelSpec(backbone="vec", height=32, width=16,
                                  backbone_factory="tests.test_backbones:VectorNet"))
    assert model.bottleneck[0].in_features == 24

    def local_net() -> nn.Module:  # defined in a function: importable by no other process
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())

    register_backbone("local_net", local_net)
    path = save_factory("local_net", tmp_path / "local_net.pkl")
    registry.clear()
    model = build_model(ModelSpec(backbone="local_net", height=32, width=16, backbone_factory=str(path)))
    assert model.bottleneck[0].in_features == 8
