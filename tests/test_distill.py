"""Server-side knowledge distillation: only the global model changes, and only public images are read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from reid.config import SiteRunSpec
from reid.data.layout import DatasetLayoutError
from reid.data.public import load_public_images
from reid.data.synthetic import DEFAULT_STYLES, generate_site
from reid.distill import DistillConfig, batch_statistics, normalised_features
from reid.models import ModelSpec, build_model, shared_state
from server.public_steps import PublicSteps
from strategies.averaging import weighted_average

CPU = torch.device("cpu")
SPEC = SiteRunSpec(model=ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32), bn_stats="average")


@pytest.fixture(scope="module")
def public_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("public")
    style = replace(DEFAULT_STYLES[3], num_train_ids=10, num_test_ids=0, num_distractors=0, num_junk=0)
    generate_site(root, 99, seed=2, style=style)
    return root


def _upload(seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(shared_state(build_model(SPEC.model), "average"))


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in record.items()}


def test_kd_moves_the_global_model_towards_the_teachers_and_nothing_else(public_root: Path) -> None:
    uploads = [_upload(1), _upload(2)]
    before_uploads = [_numpy(u) for u in uploads]
    aggregated = ArrayRecord({k: Array(v) for k, v in weighted_average([_numpy(u) for u in uploads], [1, 1]).items()})
    steps = PublicSteps(public_root, SPEC, DistillConfig(lr=0.01, epochs=3), embed_batch=16, device=CPU)
    assert steps.samples and all(public_root in s.path.parents for s in steps.samples)

    images = steps.embed_images
    teachers = [steps.model(u) for u in uploads]
    target = torch.stack([normalised_features(t, images, running_stats=True) for t in teachers]).mean(0)

    def mse(record: ArrayRecord) -> float:
        """The KD loss as training sees it (batch statistics), without dropout: the same every call."""
        model = steps.model(record)
        with torch.no_grad(), batch_statistics(model):
            return float(torch.nn.functional.mse_loss(model.features(images), target))

    torch.manual_seed(0)  # dropout inside the distillation steps
    refined = steps.refine(1, aggregated, uploads)
    assert mse(aggregated) == mse(aggregated)  # the measure itself draws nothing
    assert mse(refined) < mse(aggregated)
    changed = [k for k in refined.keys() if not np.array_equal(refined[k].numpy(), aggregated[k].numpy())]
    assert changed and not any(k.endswith(("running_mean", "running_var")) for k in changed)
    for upload, before in zip(uploads, before_uploads):  # the teachers are untouched
        assert all(np.array_equal(upload[k].numpy(), before[k]) for k in before)


def test_batch_statistics_mode_leaves_running_statistics_alone() -> None:
    model = build_model(SPEC.model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with batch_statistics(model):
        model.features(torch.randn(4, 3, 64, 32) * 3 + 1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_public_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_public_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetLayoutError, match="no readable images"):
        load_public_images(tmp_path / "empty")
