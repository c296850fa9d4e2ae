"""ReIDNet and the SHARED/LOCAL rule, last stride, and ImageNet weights from a local file."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

from reid import models as models_module
from reid.models import FreshModels, ModelSpec, build_model, is_local_key, load_shared_state, shared_state, split_state

SMALL = ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32)


def test_classifier_is_local_and_bottleneck_is_shared() -> None:
    model = build_model(SMALL, num_classes=7)
    shared, local = split_state(model.state_dict(), "average")
    assert {"classifier.weight", "classifier.bias"} <= set(local)
    assert not any(k.startswith("classifier.") for k in shared)
    assert {"bottleneck.0.weight", "bottleneck.1.weight", "bottleneck.1.running_mean"} <= set(shared)
    assert all(k.endswith("num_batches_tracked") for k in local if not k.startswith("classifier."))


def test_bn_statistics_follow_the_policy() -> None:
    assert not is_local_key("backbone.bn1.running_mean", "average")
    assert is_local_key("backbone.bn1.running_mean", "local")
    assert is_local_key("backbone.bn1.running_var", "local")
    assert not is_local_key("backbone.bn1.weight", "local")  # affine parameters are still shared
    with pytest.raises(ValueError, match="bn_stats"):
        is_local_key("x", "median")


def test_shared_state_has_the_same_keys_whatever_the_number_of_identities() -> None:
    a = shared_state(build_model(SMALL, num_classes=3), "local")
    b = shared_state(build_model(SMALL, num_classes=300), "local")
    c = shared_state(build_model(SMALL, num_classes=0), "local")
    assert a.keys() == b.keys() == c.keys()


def test_load_shared_state_refuses_missing_or_extra_keys() -> None:
    model = build_model(SMALL, num_classes=4)
    shared = shared_state(build_model(SMALL), "average")
    load_shared_state(model, shared, "average")
    torch.testing.assert_close(model.state_dict()["bottleneck.0.weight"], shared["bottleneck.0.weight"])
    with pytest.raises(ValueError, match="missing"):
        load_shared_state(model, {k: v for k, v in shared.items() if "layer4" not in k}, "average")
    with pytest.raises(ValueError, match="unexpected"):
        load_shared_state(model, {**shared, "classifier.weight": torch.zeros(4, 512)}, "average")


def test_forward_gives_logits_with_a_head_and_512_features_without() -> None:
    x = torch.randn(2, 3, 64, 32)
    assert build_model(SMALL, num_classes=9).eval()(x).shape == (2, 9)
    assert build_model(SMALL).eval()(x).shape == (2, 512)


@pytest.mark.parametrize("stride,expected", [(2, (4, 2)), (1, (8, 4))])
def test_last_stride_sets_the_final_feature_map(stride: int, expected: tuple[int, int]) -> None:
    model = build_model(ModelSpec(backbone="resnet18", last_stride=stride, height=128, width=64))
    b = model.backbone
    x = torch.randn(1, 3, 128, 64)
    x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
    assert tuple(x.shape[2:]) == expected


def test_resnet50_uses_a_2048_d_trunk_and_a_512_d_bottleneck() -> None:
    model = build_model(ModelSpec(backbone="resnet50"), num_classes=5)
    assert model.bottleneck[0].in_features == 2048 and model.bottleneck[0].out_features == 512
    assert model.backbone.layer4[0].conv2.stride == (2, 2)


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path) -> None:
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelSpec(backbone="resnet18"), pretrained=path)
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_pretrained_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found; give the path"):
        build_model(SMALL, pretrained=tmp_path / "absent.pth")
    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit backbone resnet50"):
        build_model(ModelSpec(backbone="resnet50"), pretrained=wrong)
    with pytest.raises(ValueError, match="unknown backbone 'resnet5000'"):
        build_model(ModelSpec(backbone="resnet5000"))


def test_imagenet_weights_by_name_are_fetched_through_the_torch_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    reference = resnet18(weights=None).state_dict()
    asked = []

    def fetch(url: str, progress: bool = True, check_hash: bool = False) -> dict:
        asked.append((url, check_hash))
        return reference

    monkeypatch.setattr(models_module, "load_state_dict_from_url", fetch)
    model = build_model(ModelSpec(backbone="resnet18"), pretrained="imagenet")
    assert asked == [(ResNet18_Weights.DEFAULT.url, True)]
    torch.testing.assert_close(model.backbone.layer2[0].conv1.weight, reference["layer2.0.conv1.weight"])


def test_a_failed_imagenet_download_says_how_to_pass_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, **_kwargs: object) -> dict:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(models_module, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"name resolution.*model.pretrained=/path/to/resnet50-\w+\.pth"):
        build_model(ModelSpec(backbone="resnet50"), pretrained="imagenet")
    with pytest.raises(ValueError, match="no ImageNet weights for backbone 'resnet10'"):
        build_model(SMALL, pretrained="imagenet")


def test_a_fresh_model_from_a_kept_template_equals_building_it_and_leaves_the_rng_where_building_would() -> None:
    spec, fresh = ModelSpec(backbone="resnet10", height=64, width=32), FreshModels(keep=1)
    built = []
    for _ in range(2):  # the second build of seed 3 is a copy of the first
        torch.manual_seed(3)
        model = fresh.build(spec, num_classes=7)
        built.append((model, torch.rand(4)))  # the next random draw, after building
    torch.manual_seed(3)
    reference, draw = build_model(spec, num_classes=7), torch.rand(4)
    for model, after in built:
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
        assert torch.equal(after, draw)
    assert built[0][0] is not built[1][0]
    with torch.no_grad():
        built[1][0].classifier.weight.add_(1.0)  # a copy handed out never changes the kept template
    torch.manual_seed(3)
    assert torch.equal(fresh.build(spec, num_classes=7).classifier.weight, reference.classifier.weight)
    torch.manual_seed(4)  # another seed: built afresh (and kept in place of the first, keep=1)
    other = fresh.build(spec, num_classes=7)
    assert not torch.equal(other.classifier.weight, reference.classifier.weight)
