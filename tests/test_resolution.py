"""Resolution drift: the synthetic resolution profiles, lower-resolution queries on a hand-made case,
RAF's distillation terms, and a RAF step in local training."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid.data.batch_augment import normalise
from reid.data.dataset import ReIDData, load_reid_data
from reid.data.layout import Sample
from reid.data.resolution import degrade, parse_scales
from reid.data.federations import federation_styles, site_names
from reid.data.synthetic import RESOLUTION_PROFILES, generate_site
from reid.data.tensor_cache import training_images
from reid.evaluate import evaluate_at_scales, evaluate_model
from reid.features import adapt_batchnorm
from reid.models import ModelSpec, build_model
from reid.raf import MultiResolution, RAFConfig, embedding_distance, map_distance
from reid.train import TrainConfig, train_local
from tests.conftest import TINY_STYLE


def _sharpness(folder: Path) -> float:
    """Mean absolute horizontal pixel difference: detail a low-resolution camera loses."""
    pixels = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(folder.glob("*.jpg"))[:40]]
    return float(np.mean([np.abs(np.diff(p, axis=1)).mean() for p in pixels]))


def test_resdrift_sites_are_deterministic_and_differ_in_resolution(tmp_path: Path) -> None:
    assert site_names(4, federation="synthetic-resdrift") == ["0-sharp", "1-lowres", "2-mixed", "3-medium"]
    styles = federation_styles("synthetic-resdrift", 4)
    low, sharp = styles[1].resolution, styles[0].resolution
    assert low is not None and sharp is not None and low.capture_size(0) == (32, 16) and sharp.capture_size(3) == (128, 64)
    assert styles[2].resolution is not None and {styles[2].resolution.capture_size(c) for c in range(2)} == {(128, 64), (32, 16)}
    small = {i: styles[i].__class__(**{**styles[i].__dict__, "num_train_ids": 6, "num_test_ids": 2,
                                      "num_distractors": 0, "num_junk": 0}) for i in (0, 1)}
    for name, index in (("a", 0), ("b", 0), ("low", 1)):
        generate_site(tmp_path / name, index, seed=3, style=small[index])
    digest = {name: hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / name).rglob("*.jpg")))).hexdigest()
              for name in ("a", "b")}
    assert digest["a"] == digest["b"]  # same seed, same bytes
    assert _sharpness(tmp_path / "low" / "train") < 0.5 * _sharpness(tmp_path / "a" / "train")
    with pytest.raises(ValueError, match="unknown synthetic federation"):
        federation_styles("nowhere", 2)
    assert len(RESOLUTION_PROFILES) == 4


def test_degrade_keeps_size_and_flat_images_and_removes_fine_detail() -> None:
    flat = torch.full((1, 3, 16, 8), 77, dtype=torch.uint8)
    assert torch.equal(degrade(flat, 0.25), flat)
    checker = ((torch.arange(16).view(16, 1) + torch.arange(8).view(1, 8)) % 2 * 200).to(torch.uint8).expand(1, 3, 16, 8)
    low = degrade(checker, 0.5)
    assert low.shape == checker.shape and low.dtype == torch.uint8
    assert float(low.float().std()) < 0.1 * float(checker.float().std())  # the pattern is gone ...
    assert abs(float(low.float().mean()) - 100) < 2  # ... its average stays
    assert degrade(checker, 1) is checker
    assert parse_scales("0.5 0.25") == (0.5, 0.25) and parse_scales("") == ()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        parse_scales("2")


@dataclass(frozen=True)
class _Spec:
    height: int = 32
    width: int = 16
    bottleneck_dim: int = 3


class _TextureModel(torch.nn.Module):
    """Hand-made features: mean brightness, horizontal detail, and a constant. Two people who differ
    only in a fine texture are told apart at full resolution and confused at ¼."""

    spec = _Spec()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        detail = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        return torch.stack([x.mean(dim=(1, 2, 3)) + 3.0, 5 * detail, torch.ones(len(x))], dim=1)


def test_lower_resolution_queries_lose_what_only_fine_detail_tells_apart(tmp_path: Path) -> None:
    textured = ((np.arange(32)[:, None] + np.arange(16)[None, :]) % 2 * 200).astype(np.uint8)
    images = {1: np.repeat(textured[:, :, None], 3, 2), 2: np.full((32, 16, 3), 100, np.uint8)}  # same mean
    samples = {}
    for split, cam in (("query", 1), ("gallery", 2)):
        (tmp_path / split).mkdir()
        samples[split] = []
        for pid, pixels in images.items():
            path = tmp_path / split / f"{pid:04d}_c{cam}s1_000001_01.png"
            Image.fromarray(pixels).save(path)
            samples[split].append(Sample(path, pid, cam))
    data = ReIDData("hand", tmp_path, [], samples["query"], samples["gallery"], {})
    results = evaluate_at_scales(_TextureModel(), data, torch.device("cpu"), (0.5, 0.25))  # type: ignore[arg-type]
    assert results[1.0].mAP == 1.0 and results[1.0].rank(1) == 1.0
    assert results[0.25].mAP < 1.0  # the textured person now looks like the plain one
    assert evaluate_model(_TextureModel(), data, torch.device("cpu")).mAP == results[1.0].mAP  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["nmse", "attention"])
def test_the_feature_map_term_is_zero_for_equal_maps_and_positive_otherwise(kind: str) -> None:
    torch.manual_seed(0)
    teacher = torch.rand(4, 8, 6, 3)
    assert float(map_distance(teacher.clone(), teacher, kind)) == pytest.approx(0.0, abs=1e-7)
    assert float(map_distance(teacher + 0.3 * torch.rand_like(teacher), teacher, kind)) > 1e-4


@pytest.mark.parametrize("kind", ["cosine", "similarity_kl"])
def test_the_embedding_term_is_zero_for_equal_embeddings_and_positive_otherwise(kind: str) -> None:
    torch.manual_seed(0)
    teacher = torch.randn(6, 16)
    assert float(embedding_distance(teacher.clone(), teacher, kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_distance(teacher + torch.randn_like(teacher), teacher, kind)) > 1e-3


@pytest.mark.parametrize("mode", ["distill", "augment"])
def test_raf_students_learn_from_the_detached_teacher_and_the_baseline_from_labels(tiny_site: Path,
                                                                                  mode: str) -> None:
    data = load_reid_data(tiny_site, verify=False)
    images = training_images(data, 64, 32)
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32),
                        num_classes=data.num_train_ids).eval()  # running BN statistics: rows do not interact
    multires = MultiResolution(RAFConfig(enabled=True, scales="0.5 0.25", mode=mode))
    x, y = normalise(images.images[:8]), images.labels[:8]
    batch = multires.batch(x)
    assert batch.shape[0] == 3 * 8 and torch.equal(batch[:8], x) and multires.passes_per_image == 3
    feature_map = model.feature_map(batch)
    feature_map.retain_grad()
    embedding = model.embedding(feature_map)
    loss = multires.loss(feature_map, embedding, y, model.classifier, model.bottleneck[2], torch.nn.CrossEntropyLoss())
    loss.backward()
    assert loss.item() > 0 and feature_map.grad is not None
    assert float(feature_map.grad[8:].abs().sum()) > 0  # the students move
    assert model.backbone.conv1.weight.grad is not None and float(model.backbone.conv1.weight.grad.abs().sum()) > 0
    if mode == "distill":  # the teacher's rows get nothing from the students' term, and no label is used
        assert float(feature_map.grad[:8].abs().sum()) == 0 and model.classifier.weight.grad is None
    else:  # the baseline trains the low-resolution copies on the labels, through the classifier
        assert float(model.classifier.weight.grad.abs().sum()) > 0


def test_local_training_with_raf_counts_its_passes(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site, verify=False)
    images = training_images(data, 64, 32)
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32), num_classes=data.num_train_ids)
    multires = MultiResolution(RAFConfig(enabled=True, scales="0.5"))
    stats = train_local(model, images, TrainConfig(batch_size=16, lr=0.01), torch.device("cpu"), multires=multires)
    assert np.isfinite(stats.loss) and stats.images == (len(images) // 16) * 16
    with pytest.raises(ValueError, match="raf.mode"):
        RAFConfig(mode="teach")


def test_adapting_batchnorm_takes_the_new_sites_statistics(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site, verify=False)
    images = training_images(data, 64, 32).images[:40]
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32))
    adapt_batchnorm(model, images, torch.device("cpu"), batch_size=64)  # one batch: the running mean is its mean
    with torch.no_grad():
        expected = model.backbone.conv1(normalise(images)).mean(dim=(0, 2, 3))
    assert torch.allclose(model.backbone.bn1.running_mean, expected, atol=1e-5)
    assert not model.training and model.backbone.bn1.momentum == 0.1  # restored


@pytest.mark.parametrize("algorithm", ["fedklpr", "fedureid"])
def test_raf_combines_with_fedklpr_and_fedureid_on_a_site(tiny_site: Path, algorithm: str) -> None:
    """The presets' site settings with RAF switched on, through the ClientApp as Flower calls it."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from clients.app import app
    from reid.models import shared_state
    from server.config import compose_config, site_run_spec

    from strategies.pruning_plan import magnitude_mask, prunable_keys
    from strategies.sparse_records import encode_record

    overrides = ("model=small algorithm.raf.enabled=true algorithm.raf.scales=[0.5] train.batch_size=16 "
                 "algorithm.unsupervised.epochs_first=1 algorithm.kll.start_round=1")
    spec = site_run_spec(compose_config({"algorithm": algorithm, "overrides": overrides}))
    torch.manual_seed(0)
    arrays = ArrayRecord(shared_state(build_model(spec.model), spec.bn_stats))
    if algorithm == "fedklpr":  # the server's pruned global model, as FedKLPR sends it
        values = {k: a.numpy() for k, a in arrays.items()}
        masks = {k: magnitude_mask(values[k], 0.5) for k in prunable_keys(values)}
        arrays = encode_record({k: v * masks[k] if k in masks else v for k, v in values.items()}, masks)
    config = ConfigRecord({**spec.to_flat(), "server-round": 1})
    context = Context(run_id=1, node_id=7, node_config={"data-root": str(tiny_site), "dataset": "tiny"},
                      state=RecordDict(), run_config={})
    reply = app(Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=7,
                        message_type="train"), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert metrics["image-passes"] == 2 * (metrics["num-examples"] // 16) * 16  # full resolution + ½
    if algorithm == "fedklpr":
        assert metrics["kept-fraction"] == pytest.approx(0.5, abs=0.01)  # trained on the received mask, with RAF
        assert metrics["kl-divergence"] > 0
    else:
        assert metrics["clusters"] < metrics["num-examples"]
