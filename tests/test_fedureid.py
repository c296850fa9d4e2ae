"""FedUReID on a site: the merge schedules, the personalised update, dynamic epochs, a site with no
labels at all, training that never reads a pid, and clustering that survives a restart. The
ClientApp is called as Flower calls it, on real images."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import clients.site
import clients.unsupervised
from clients.app import app
from clients.kept import CLUSTERS_KEY, PROGRESS_KEY
from reid.buc import ClusterMemory
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData, load_reid_data
from reid.data.layout import UNLABELLED_PID, DatasetLayoutError
from reid.data.tensor_cache import LabelledImages, load_images
from reid.features import extract_features
from reid.models import ModelSpec, build_model, shared_state
from reid.train import TrainConfig, train_local
from reid.unsupervised import UnsupervisedConfig, blend_states, merge_count
from strategies.validation import RUN_TAG_KEY

UNSUPERVISED = UnsupervisedConfig(enabled=True, merge="personalized", epochs_first=1, epochs_later=1, rounds=3,
                                  images_per_identity=4)
SPEC = SiteRunSpec(model=ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32),
                   train=TrainConfig(batch_size=16), bn_stats="local", unsupervised=UNSUPERVISED)


# ----- schedules and update rule -------------------------------------------------------------------

def test_fixed_merging_takes_a_share_of_the_images_and_stops_after_the_reference_steps() -> None:
    fixed = UnsupervisedConfig(enabled=True, merge="fixed", merge_percent=0.05)
    assert merge_count(fixed, 400, 400, 0, 8) == 20
    assert merge_count(fixed, 400, 40, 18, 8) == 20  # still the share of the images, not of the clusters
    assert merge_count(fixed, 400, 20, 19, 8) == 0  # 1/0.05 - 1 = 19 merges, then no more
    assert merge_count(fixed, 400, 5, 3, 8) == 4  # never below one cluster


@pytest.mark.parametrize(("images", "rounds", "per_identity"), [(432, 20, 8), (153, 20, 8), (153, 3, 4), (50, 7, 9.5)])
def test_personalized_merging_reaches_its_target_in_the_last_round(images: int, rounds: int,
                                                                  per_identity: float) -> None:
    cfg = UnsupervisedConfig(enabled=True, merge="personalized", rounds=rounds, images_per_identity=per_identity)
    clusters, merges, counts = images, 0, []
    for _ in range(rounds):  # relabel=local: a merge after every round; the last one finds nothing left to do
        count = merge_count(cfg, images, clusters, merges, per_identity)
        counts.append(count)
        clusters -= count
        merges += count > 0
    assert clusters == max(1, round(images / per_identity))
    assert counts[-1] == 0 and all(c > 0 for c in counts[:-1])  # spread over every round but the last
    assert max(counts) - min(counts[:-1]) <= 1  # evenly


def test_personalized_merging_needs_the_number_of_rounds() -> None:
    with pytest.raises(ValueError, match="federation.rounds"):
        merge_count(UnsupervisedConfig(enabled=True, merge="personalized"), 100, 100, 0, 8)


def test_the_ema_update_blends_floats_and_keeps_counters() -> None:
    received = {"w": torch.tensor([1.0, 3.0]), "steps": torch.tensor(7), "new": torch.tensor([2.0])}
    previous = {"w": torch.tensor([3.0, 5.0]), "steps": torch.tensor(1)}
    blended = blend_states(received, previous, local_weight=0.25)
    assert torch.equal(blended["w"], torch.tensor([1.5, 3.5]))
    assert int(blended["steps"]) == 7 and torch.equal(blended["new"], received["new"])


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="relabel"):
        UnsupervisedConfig(relabel="cloud")
    with pytest.raises(ValueError, match="out of range"):
        UnsupervisedConfig(merge_percent=1.5)


# ----- training pieces -----------------------------------------------------------------------------

def test_the_vectorised_memory_update_equals_the_image_by_image_rule() -> None:
    torch.manual_seed(1)
    slots = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    features, labels = torch.randn(4, 8), torch.tensor([5, 0, 2, 3])  # no cluster twice: one vectorised step
    memory = ClusterMemory.from_slots(slots, momentum=0.3)
    memory.update(features, labels)
    expected = slots.clone()
    for feature, label in zip(torch.nn.functional.normalize(features, dim=1), labels.tolist()):
        expected[label] = torch.nn.functional.normalize(0.3 * expected[label] + 0.7 * feature, dim=0)
    assert torch.allclose(memory.slots, expected, atol=1e-6)
    assert torch.equal(memory.slots[1], slots[1])  # untouched clusters stay


def test_dynamic_epochs_stop_once_the_accuracy_is_reached(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site, verify=False)
    images = load_images([s.path for s in data.train], 64, 32)[:48]
    pseudo = LabelledImages(images, torch.arange(len(images)))
    cfg = TrainConfig(batch_size=16, local_epochs=2)

    def run(stop: float | None) -> int:
        torch.manual_seed(0)
        model = build_model(SPEC.model)
        memory = ClusterMemory(torch.from_numpy(extract_features(model, images, torch.device("cpu"))), pseudo.labels)
        stats = train_local(model, pseudo, cfg, torch.device("cpu"), head=memory, stop_accuracy=stop)
        assert stats.images == stats.epochs * (len(images) // 16) * 16
        return stats.epochs

    assert run(1.01) == 2  # never reached: every epoch runs
    assert run(0.0) == 1  # reached after the first epoch


# ----- a site through the ClientApp ----------------------------------------------------------------

def _message(arrays: ArrayRecord, server_round: int, spec: SiteRunSpec = SPEC) -> Message:
    config = ConfigRecord({**spec.to_flat(), "server-round": server_round, RUN_TAG_KEY: "run-a"})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")


def _context(site: Path, state_dir: Path | None = None) -> Context:
    node_config: dict = {"data-root": str(site), "dataset": "tiny-site"}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _global() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(shared_state(build_model(SPEC.model), SPEC.bn_stats))


def _train(context: Context, server_round: int, arrays: ArrayRecord | None = None,
           spec: SiteRunSpec = SPEC) -> RecordDict:
    reply = app(_message(arrays or _global(), server_round, spec), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply.content


def _unlabelled_copy(site: Path, tmp_path: Path) -> Path:
    """The site with its training crops renamed to names that carry no identity or camera."""
    copy = tmp_path / "unlabelled-site"
    shutil.copytree(site, copy)
    for index, path in enumerate(sorted((copy / "train").iterdir())):
        path.rename(path.with_name(f"crop {index:04d}{path.suffix}"))
    return copy


def test_a_site_without_any_labels_trains_clusters_and_reports_no_purity(tiny_site: Path, tmp_path: Path) -> None:
    site = _unlabelled_copy(tiny_site, tmp_path)
    with pytest.raises(DatasetLayoutError, match="no usable images"):
        load_reid_data(site, verify=False)  # a supervised run cannot use this folder, and says why
    data = load_reid_data(site, verify=False, labelled_train=False)
    assert {s.pid for s in data.train} == {UNLABELLED_PID} and "unlabelled" in data.summary()
    context = _context(site)
    content = _train(context, 1)
    metrics = content["metrics"]
    count = len(list((site / "train").iterdir()))
    assert metrics["num-examples"] == count and metrics["epochs"] == 1
    assert metrics["image-passes"] == (count // 16) * 16 and metrics["feature-passes"] == 2 * 2 * count
    assert metrics["clusters"] == count - metrics["clusters-merged"] < count  # merged after training
    assert "cluster-nmi" not in metrics  # nothing to compare with
    assert "num-identities" not in metrics
    assert set(content["arrays"].keys()) == set(_global().keys())  # backbone + bottleneck; no classifier
    labels = context.state[CLUSTERS_KEY]["labels"].numpy()
    assert len(labels) == count and labels.max() + 1 == metrics["clusters"]


def test_training_never_reads_a_pid(tiny_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training pid scrambled: bit-identical uploads and clusters; only the purity report,
    which compares clusters with the hidden identities, sees a difference."""
    real = _train(_context(tiny_site), 1)
    load_reid_data = clients.site.load_reid_data
    shuffle = random.Random(3)

    def scrambled(*args: object, **kwargs: object) -> ReIDData:
        data = load_reid_data(*args, **kwargs)  # type: ignore[arg-type]
        return replace(data, train=[replace(s, pid=shuffle.randrange(1000)) for s in data.train])

    monkeypatch.setattr(clients.site, "load_reid_data", scrambled)
    monkeypatch.setattr(clients.site, "_SITES", {})  # a new Site, which scans the folder again
    context = _context(tiny_site)
    other = _train(context, 1)
    assert [a.data for a in real["arrays"].values()] == [a.data for a in other["arrays"].values()]
    assert real["metrics"]["clusters"] == other["metrics"]["clusters"]
    assert real["metrics"]["train-loss"] == other["metrics"]["train-loss"]
    assert real["metrics"]["cluster-nmi"] != other["metrics"]["cluster-nmi"]


def test_a_restarted_site_continues_its_clustering_from_disk(tiny_site: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    spec = replace(SPEC, unsupervised=replace(UNSUPERVISED, epochs_first=2))  # a first round is told apart
    first_context = _context(tiny_site, state_dir)
    first = _train(first_context, 1, spec=spec)
    assert first["metrics"]["epochs"] == 2
    saved_labels = first_context.state[CLUSTERS_KEY]["labels"].numpy().copy()
    restarted = _context(tiny_site, state_dir)  # a new SuperNode process: empty context.state
    second = _train(restarted, 2, first["arrays"], spec)
    metrics = second["metrics"]
    assert metrics["epochs"] == 1  # not a first round again
    assert int(restarted.state[PROGRESS_KEY]["rounds-trained"]) == 2
    assert metrics["clusters"] == (saved_labels.max() + 1) - metrics["clusters-merged"]
    labels = restarted.state[CLUSTERS_KEY]["labels"].numpy()  # merged from the saved clusters: never split
    for cluster in np.unique(saved_labels):
        assert len(np.unique(labels[saved_labels == cluster])) == 1


@pytest.mark.parametrize("update", ["ema", "none"])
def test_an_ema_site_starts_from_a_blend_of_the_global_and_its_last_model(tiny_site: Path, update: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = replace(SPEC, unsupervised=replace(UNSUPERVISED, update=update, ema_local=0.25))
    context = _context(tiny_site)
    first = app(_message(_global(), 1, spec), context).content["arrays"]  # this site's round-1 model
    torch.manual_seed(5)
    fresh = ArrayRecord(shared_state(build_model(SPEC.model), SPEC.bn_stats))  # round 2's "global" model
    starts = []
    run_round = clients.unsupervised.run_round

    def spy(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return run_round(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(clients.unsupervised, "run_round", spy)
    reply = app(_message(fresh, 2, spec), context)
    assert not reply.has_error()
    key = "bottleneck.0.weight"
    received, previous = torch.from_numpy(fresh[key].numpy()), torch.from_numpy(first[key].numpy())
    expected = 0.75 * received + 0.25 * previous if update == "ema" else received
    assert torch.allclose(starts[0][key], expected, atol=1e-6)


def test_global_relabelling_clusters_with_the_received_model_before_training(tiny_site: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec = replace(SPEC, unsupervised=replace(UNSUPERVISED, relabel="global"))
    context = _context(tiny_site)
    first = app(_message(_global(), 1, spec), context).content
    count = first["metrics"]["num-examples"]
    assert first["metrics"]["clusters"] == count and first["metrics"]["clusters-merged"] == 0  # nothing yet
    seen = []
    run_round = clients.unsupervised.run_round

    def spy(model: torch.nn.Module, images: torch.Tensor, state: object, *args: object, **kwargs: object) -> object:
        result = run_round(model, images, state, *args, **kwargs)  # type: ignore[arg-type]
        seen.append((state, result[0]))
        return result

    monkeypatch.setattr(clients.unsupervised, "run_round", spy)
    second = app(_message(first["arrays"], 2, spec), context).content["metrics"]
    assert 0 < second["clusters-merged"] and second["clusters"] == count - second["clusters-merged"]
    (before, after), = seen
    assert before.num_clusters == count and after.merges_done == 1
    assert second["feature-passes"] == 2 * count  # one clustering pass, at the start of the round
