"""synthetic-fedreid9's sites and camera looks, the server's handling of held-out sites under both
protocols, and feddg's image style sharing: on generated files and hand-built messages (the
end-to-end runs are in test_presets_e2e)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients import outgoing
from clients.app import handle
from reid.config import SiteRunSpec
from reid.data import fedreid9
from reid.data.dataset import load_reid_data
from reid.data.federations import generate_sites, site_names
from reid.data.synthetic import generate_site
from reid.models import ModelSpec, build_model, shared_state
from reid.data.camera_looks import draw_look
from reid.style import STYLE_WIDTH, StyleConfig, StyleSharing, image_styles, restyle
from reid.train import TrainConfig
from strategies.fedpav import FedPav
from strategies.validation import (BN_STATS_KEY, SHARE_BN_KEY, SOURCE_ONLY, STYLE_BANK_KEY, STYLE_KEY, TARGET_ADAPTED,
                                   UNSEEN_PROTOCOL_KEY, check_style)
from tests.test_fedpav import NodeList, _arrays, _reply, _started


@pytest.fixture(scope="module")
def fedreid9_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedreid9")
    generate_sites(root, len(fedreid9.styles()), seed=0, federation=fedreid9.FEDERATION)
    return root


def test_the_nine_sites_keep_the_datasets_order_with_over_twenty_fold_spread(fedreid9_root: Path) -> None:
    names = site_names(15, 0, fedreid9.FEDERATION)
    assert names == [f.name for f in fedreid9.PUBLISHED] + list(fedreid9.HELD_OUT)
    train = {}
    for figures, style in zip(fedreid9.PUBLISHED, fedreid9.training_styles()):
        data = load_reid_data(fedreid9_root / figures.name)
        ids = fedreid9.scaled_ids(figures.train_ids)
        assert data.num_train_ids == ids == style.num_train_ids
        assert len(data.train) == round(ids * style.images_per_identity)  # exactly the intended images
        assert len({s.pid for s in data.query}) == fedreid9.scaled_ids(figures.test_ids, fedreid9.MIN_TEST_IDS)
        assert {s.camid for s in data.train + data.gallery} <= set(range(1, figures.cameras + 1))
        assert len({s.camid for s in data.train + data.gallery}) == figures.cameras  # every camera is used
        for query in data.query:  # a true match from another camera
            assert any(g.pid == query.pid and g.camid != query.camid for g in data.gallery)
        train[figures.name] = len(data.train)
    sizes = [train[f.name] for f in fedreid9.PUBLISHED]
    assert sizes == sorted(sizes, reverse=True)  # the published order by training images
    assert max(sizes) >= 20 * min(sizes)
    for name in fedreid9.HELD_OUT:  # at least 100 test identities, each with a true match from another camera
        data = load_reid_data(fedreid9_root / name)
        assert len({s.pid for s in data.query}) == fedreid9.HELD_OUT_TEST_IDS >= 100
    # the in-distribution held-out sites are drawn per data seed; the out-of-range ones are fixed
    assert fedreid9.held_out_styles(1)[:4] != fedreid9.held_out_styles(0)[:4] == fedreid9.held_out_styles(0)[:4]
    assert fedreid9.held_out_styles(1)[4:] == fedreid9.held_out_styles(0)[4:]


def test_the_federation_is_byte_for_byte_deterministic(fedreid9_root: Path, tmp_path: Path) -> None:
    index = 8  # ilids, the smallest: regenerated alone, it must match the whole federation's copy
    style = fedreid9.styles()[index]
    generate_site(tmp_path / style.name, index, seed=0, style=style)

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}

    assert digest(tmp_path / style.name) == digest(fedreid9_root / style.name) != {}


def _named(strategy: FedPav, names: dict[int, str]) -> None:
    strategy.learn_names([Message(content=outgoing.name_reply(name), reply_to=query)
                          for query, name in zip(strategy.configure_query(names), names.values())])


def test_the_camera_looks_are_seeded_and_survive_per_channel_normalisation() -> None:
    """A camera's colour matrix, tone curves, vignetting and shadow change an image in ways a per-channel
    affine map (what a first BatchNorm layer normalises away) cannot undo; a gain-and-cast-only camera's
    change it undoes exactly. The same seed draws the same look."""
    rng = np.random.default_rng(3)
    scene = np.clip(rng.normal(0.5, 0.2, (64, 32, 3)), 0, 1).astype(np.float32)
    scene[20:40] = scene[20:40] * np.array([0.9, 0.3, 0.2], np.float32)  # a red coat
    assert draw_look(np.random.default_rng([0, 1])) == draw_look(np.random.default_rng([0, 1]))

    def unexplained(seen: np.ndarray) -> float:
        """Share of the camera image's variance that the best per-channel affine map of the scene leaves."""
        left = []
        for c in range(3):
            design = np.stack([scene[..., c].ravel(), np.ones(scene[..., c].size)], axis=1)
            fit, *_ = np.linalg.lstsq(design, seen[..., c].ravel(), rcond=None)
            left.append(np.var(seen[..., c].ravel() - design @ fit) / np.var(seen[..., c]))
        return float(np.mean(left))

    gain_and_cast = np.clip(scene * np.array([1.1, 0.95, 0.8], np.float32) * 0.9, 0, 1)
    assert unexplained(gain_and_cast) < 1e-6
    looks = [draw_look(np.random.default_rng([7, i])) for i in range(8)]
    left = [unexplained(look.apply(scene, np.random.default_rng(0))) for look in looks]
    assert np.median(left) > 0.05, left


def _named(strategy: FedPav, names: dict[int, str]) -> None:
    strategy.learn_names([Message(content=outgoing.name_reply(name), reply_to=query)
                          for query, name in zip(strategy.configure_query(names), names.values())])


def _bn_reply(message: Message, site: str, examples: int, value: float) -> Message:
    stats = ArrayRecord({"bn1.running_mean": Array(np.full(4, value, np.float32)),
                         "bn1.running_var": Array(np.full(4, 2 * value, np.float32))})
    return _reply(message, _arrays([1, 1], 1), {"num-examples": examples}, site, **{BN_STATS_KEY: stats})


def test_held_out_sites_are_ranked_under_both_protocols_with_the_federations_statistics() -> None:
    """No training for a held-out site; each evaluation asks it twice: target-adapted, and source-only with
    the training sites' BatchNorm statistics averaged by their examples (none before any site sent some)."""
    strategy = FedPav(min_sites=2, held_out=["night"])
    assert strategy.unnamed([1, 2, 3]) == [1, 2, 3]
    assert [q.metadata.message_type for q in strategy.configure_query([1, 2, 3])] == ["query"] * 3
    assert _started(strategy, [1, 2, 3]) == []  # nobody is trained before the server knows who is held out
    _named(strategy, {1: "mall", 2: "night", 3: "campus"})
    trained = _started(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in trained) == [1, 3]
    config = ConfigRecord({"bn_stats": "local"})
    before = strategy.configure_unseen(3, _arrays([0, 0], 0), config, NodeList([1, 2, 3]))
    assert [(m.metadata.dst_node_id, label, protocol) for m, label, protocol in before] == [(2, "global", TARGET_ADAPTED)]
    replies = [_bn_reply(trained[0], "mall", 30, 1.0), _bn_reply(trained[1], "campus", 10, 5.0)]
    strategy.aggregate_train(3, replies)
    odd = _bn_reply(trained[1], "campus", 10, 9.0)  # a later upload whose statistics do not fit the others'
    odd.content[BN_STATS_KEY] = ArrayRecord({"bn1.running_mean": Array(np.zeros(7, np.float32))})
    strategy.keep_bn_stats(strategy._checked_uploads([odd])[0], "num-examples")
    assert strategy.bn_stats_by_site["campus"][0]["bn1.running_mean"][0] == 5.0  # left out, the update's own check aside
    unseen = strategy.configure_unseen(3, _arrays([0, 0], 0), config, NodeList([1, 2, 3]))
    assert [(m.metadata.dst_node_id, protocol) for m, _, protocol in unseen] == [(2, SOURCE_ONLY), (2, TARGET_ADAPTED)]
    source_only, adapted = (m for m, _, _ in unseen)
    assert source_only.content["config"][UNSEEN_PROTOCOL_KEY] == SOURCE_ONLY
    mean = source_only.content[BN_STATS_KEY]["bn1.running_mean"].numpy()
    assert np.allclose(mean, (30 * 1.0 + 10 * 5.0) / 40)  # weighted as FedAvg weighs the updates
    assert BN_STATS_KEY not in adapted.content.keys()


def test_unseen_results_are_kept_apart_per_protocol_with_the_best_model_per_site() -> None:
    strategy = FedPav(min_sites=2, held_out=["night"])
    _named(strategy, {2: "night"})
    asked = [Message(content=RecordDict(), dst_node_id=2, message_type="evaluate") for _ in range(3)]
    for message, mid in zip(asked, ("m1", "m2", "m3")):
        message.metadata._message_id = mid  # what the SuperLink assigns when the message is pushed
    metrics = [{"rank1": r, "rank5": r, "rank10": r, "mAP": m, "mINP": m} for r, m in ((0.2, 0.3), (0.4, 0.25), (0.1, 0.1))]
    replies = [Message(content=outgoing.evaluation_reply("night", MetricRecord(m)), reply_to=a)
               for a, m in zip(asked, metrics)]
    unseen = strategy.aggregate_unseen(replies, {"m1": ("mall", TARGET_ADAPTED), "m2": ("campus", TARGET_ADAPTED),
                                                 "m3": ("mall", SOURCE_ONLY)})
    adapted = unseen[TARGET_ADAPTED]["sites"]["night"]
    assert adapted["model"] == "mall" and adapted["mAP"] == 0.3
    assert adapted["mAP-by-model"] == {"campus": 0.25, "mall": 0.3}
    assert unseen[SOURCE_ONLY]["mean"]["mAP"] == 0.1 and unseen[TARGET_ADAPTED]["mean"]["mAP"] == 0.3


def _style(value: float, cameras: int = 2) -> ArrayRecord:
    return ArrayRecord({STYLE_KEY: Array(np.full((cameras, STYLE_WIDTH), value, np.float32))})


def test_the_style_bank_sends_each_site_the_others_camera_styles_and_drops_malformed_ones() -> None:
    strategy = FedPav(min_sites=3, share_styles=True)
    sent = _started(strategy, [1, 2, 3])
    assert all(STYLE_BANK_KEY not in m.content.keys() for m in sent)  # nothing shared yet
    bad = ArrayRecord({STYLE_KEY: Array(np.full((2, STYLE_WIDTH), np.nan, dtype=np.float32))})
    replies = [_reply(sent[0], _arrays([1, 1], 1), {"num-examples": 10}, "a", **{STYLE_KEY: _style(1.0, 2)}),
               _reply(sent[1], _arrays([1, 1], 1), {"num-examples": 10}, "b", **{STYLE_KEY: _style(2.0, 3)}),
               _reply(sent[2], _arrays([1, 1], 1), {"num-examples": 10}, "c", **{STYLE_KEY: bad})]
    arrays, _ = strategy.aggregate_train(3, replies)
    assert set(strategy.last_train.accepted) == {"a", "b", "c"}  # a malformed style costs the style, not the update
    assert sorted(strategy.styles) == ["a", "b"]
    following = {m.metadata.dst_node_id: m for m in strategy.configure_train(4, arrays, ConfigRecord(),
                                                                                 NodeList([1, 2, 3]))}
    bank_of = {n: following[n].content[STYLE_BANK_KEY][STYLE_BANK_KEY].numpy() for n in following}
    assert bank_of[1].shape == (3, STYLE_WIDTH) and (bank_of[1] == 2.0).all()  # a gets b's cameras, not its own
    assert bank_of[2].shape == (2, STYLE_WIDTH) and bank_of[3].shape == (5, STYLE_WIDTH)


def test_a_site_shares_one_style_row_per_camera_counted_and_far_smaller_than_an_image(tiny_sites: Path) -> None:
    """A real training message through the ClientApp's handler: the reply's style is one [cameras, 33]
    float32 array of colour statistics, its bytes reported, and no image; anything else is refused."""
    spec = SiteRunSpec(model=ModelSpec(backbone="resnet10", height=64, width=32), train=TrainConfig(batch_size=16),
                       style=StyleConfig(enabled=True))
    torch.manual_seed(0)
    arrays = ArrayRecord(shared_state(build_model(spec.model), spec.bn_stats))
    bank = np.tile(np.concatenate([[0.5] * 3, np.eye(3).ravel() * 0.02, np.linspace(0.2, 0.8, 21)]), (2, 1))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({**spec.to_flat(), "server-round": 2,
                                                                    SHARE_BN_KEY: True}),
                          STYLE_BANK_KEY: ArrayRecord({STYLE_BANK_KEY: Array(bank.astype(np.float32))})})
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={"sites-root": str(tiny_sites)})
    reply = handle("train", content, context)
    style = reply[STYLE_KEY][STYLE_KEY].numpy()
    cameras = len({s.camid for s in load_reid_data(tiny_sites / site_names(3)[0]).train})
    assert list(reply[STYLE_KEY].keys()) == [STYLE_KEY] and style.shape == (cameras, STYLE_WIDTH)
    assert style.dtype == np.float32 and check_style(style, STYLE_WIDTH) is None
    assert reply["metrics"]["style-bytes"] == style.nbytes < 64 * 32 * 3 / 4  # under a quarter of one 64x32 image
    assert reply["metrics"]["restyled-images"] > 0
    # asked for (the run ranks held-out sites source-only): its BatchNorm running statistics, nothing else
    sent = set(reply[BN_STATS_KEY].keys())
    assert sent and all(k.endswith((".running_mean", ".running_var")) for k in sent)
    assert not any(k.startswith("classifier") for k in sent)
    with pytest.raises(outgoing.OutgoingRefused, match="style"):  # an image is never sent as a style
        outgoing.training_reply("x", {}, {}, ConfigRecord(), False, {}, None, {}, "float32",
                                np.zeros((64, 32, 3), dtype=np.float32))


def test_restyling_carries_the_targets_colour_and_keeps_restyled_rows_out_of_batchnorm() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 16) * 0.6 + 0.2
    targets = image_styles(torch.rand(6, 3, 32, 16) ** 2 * torch.tensor([1.0, 0.5, 0.8])[:, None, None])
    out = restyle(images, targets, tone=False)
    got = image_styles(out)
    assert torch.allclose(got[:, :12], targets[:, :12], atol=0.02)  # mean and full colour covariance
    toned = image_styles(restyle(images, targets, tone=True))
    assert (toned[:, 12:] - targets[:, 12:]).abs().mean() < (image_styles(images)[:, 12:] - targets[:, 12:]).abs().mean()
    norm = torch.nn.BatchNorm2d(3)
    sharing = StyleSharing(StyleConfig(enabled=True, probability=0.5), targets.numpy(), seed=3)
    x = torch.randn(8, 3, 4, 4)
    restyled = sharing(x)
    clean = sharing._clean
    assert clean is not None and 0 < int((~clean).sum()) < 8 and sharing.restyled == int((~clean).sum())
    with sharing.clean_running_stats(norm):
        norm(restyled)
    assert torch.allclose(norm.running_mean, 0.1 * x[clean].mean((0, 2, 3)), atol=1e-6)  # real rows only
    assert norm.momentum == 0.1


def test_without_sharing_each_picked_image_takes_another_batch_images_style_never_the_bank() -> None:
    """The recommended feddg_no_share: targets are other images of the site's own batch, even when a
    bank of other sites' styles arrived; an image is never restyled towards itself."""
    from reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    colours = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8], [0.5, 0.5, 0.5]])
    pixels = (colours[:, :, None, None] + 0.05 * torch.rand(4, 3, 16, 8, generator=torch.Generator().manual_seed(0)))
    bank = image_styles(torch.full((1, 3, 16, 8), 0.95)).numpy()  # a near-white camera no image resembles
    sharing = StyleSharing(StyleConfig(enabled=True, share=False, probability=1.0), bank, seed=5)
    out = sharing((pixels - mean) / std) * std + mean
    means = out.flatten(2).mean(2)
    for index, row in enumerate(means):  # each image now carries the mean colour of another image of the batch
        distances = (colours - row).norm(dim=1)
        assert distances.min() < 0.06 and int(distances.argmin()) != index and (row - 0.95).abs().max() > 0.1
    assert sharing.restyled == 4


def test_fedreid_sim_runs_synthetic_fedreid9_with_its_profile_or_a_chosen_group(fedreid9_root: Path) -> None:
    """What `fedreid-sim --federation synthetic-fedreid9` submits: all fifteen sites in order with the
    profile that holds six out, or (the leave-one-site-out bench) exactly the named group."""
    from server.simulate import parse_args

    whole = parse_args(["--federation", fedreid9.FEDERATION, "--sites-root", str(fedreid9_root)])
    assert whole.profile == "fedreid9_synthetic" and whole.sites == 15
    assert whole.site_names == tuple(site_names(15, 0, fedreid9.FEDERATION))
    group = parse_args(["--federation", fedreid9.FEDERATION, "--sites-root", str(fedreid9_root),
                        "--site-names", "market", "msmt17", "cuhk01", "cuhk03"])
    assert group.sites == 4 and group.site_names == ("market", "msmt17", "cuhk01", "cuhk03")


def test_a_source_only_ranking_reads_no_image_of_the_held_out_site_before_ranking(
        tiny_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Source-only: the federation's statistics come in the message and the site's own training images
    are never read (its AdaBN pass is what would read them); target-adapted reads them first."""
    import clients.site

    def no_images(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the held-out site read its own training images before ranking")

    monkeypatch.setattr(clients.site, "load_images", no_images)
    spec = SiteRunSpec(model=ModelSpec(backbone="resnet10", height=64, width=32))
    torch.manual_seed(0)
    model = build_model(spec.model)
    stats = {k: Array(np.full(v.shape, 0.5 if k.endswith("mean") else 2.0, np.float32))
             for k, v in model.state_dict().items() if k.endswith((".running_mean", ".running_var"))}

    def ask(protocol: str) -> RecordDict:
        content = RecordDict({"arrays": ArrayRecord(shared_state(model, spec.bn_stats)),
                              "config": ConfigRecord({**spec.to_flat(), "server-round": 1, UNSEEN_PROTOCOL_KEY: protocol})})
        if protocol == SOURCE_ONLY:
            content[BN_STATS_KEY] = ArrayRecord(stats)
        context = Context(run_id=8, node_id=4, node_config={"partition-id": 2, "num-partitions": 3},
                          state=RecordDict(), run_config={"sites-root": str(tiny_sites)})
        return handle("evaluate", content, context)

    ranked = ask(SOURCE_ONLY)
    assert 0 <= ranked["metrics"]["mAP"] <= 1
    with pytest.raises(AssertionError, match="read its own training images"):
        ask(TARGET_ADAPTED)
