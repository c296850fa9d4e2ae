"""synthetic-fedreid9's sites, the server's handling of held-out sites, and feddg_ccst's style
sharing: on generated files and hand-built messages (the end-to-end runs are in test_presets_e2e)."""

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
from reid.style import StyleConfig, StyleMixer
from reid.train import TrainConfig
from strategies.fedpav import FedPav
from strategies.validation import STYLE_BANK_KEY, STYLE_KEY, check_style
from tests.test_fedpav import NodeList, _arrays, _reply, _started


@pytest.fixture(scope="module")
def fedreid9_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedreid9")
    generate_sites(root, len(fedreid9.styles()), seed=0, federation=fedreid9.FEDERATION)
    return root


def test_the_nine_sites_keep_the_datasets_order_with_over_twenty_fold_spread(fedreid9_root: Path) -> None:
    names = site_names(11, 0, fedreid9.FEDERATION)
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
    for name in fedreid9.HELD_OUT:
        assert len(load_reid_data(fedreid9_root / name).query) > 30


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


def test_held_out_sites_get_no_training_and_unnamed_nodes_are_asked_first() -> None:
    strategy = FedPav(min_sites=2, held_out=["night"])
    assert strategy.unnamed([1, 2, 3]) == [1, 2, 3]
    queries = strategy.configure_query([1, 2, 3])
    assert [q.metadata.message_type for q in queries] == ["query"] * 3
    assert _started(strategy, [1, 2, 3]) == []  # nobody is trained before the server knows who is held out
    _named(strategy, {1: "mall", 2: "night", 3: "campus"})
    assert strategy.unnamed([1, 2, 3]) == []
    trained = _started(strategy, [1, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in trained) == [1, 3]
    unseen = strategy.configure_unseen(3, _arrays([0, 0], 0), ConfigRecord(), NodeList([1, 2, 3]))
    assert [(m.metadata.dst_node_id, m.metadata.message_type, label) for m, label in unseen] == [(2, "evaluate", "global")]


def test_unseen_results_keep_the_best_model_per_held_out_site() -> None:
    strategy = FedPav(min_sites=2, held_out=["night"])
    _named(strategy, {2: "night"})
    asked = [Message(content=RecordDict(), dst_node_id=2, message_type="evaluate") for _ in range(2)]
    for message, mid in zip(asked, ("m1", "m2")):
        message.metadata._message_id = mid  # what the SuperLink assigns when the message is pushed
    metrics = [{"rank1": r, "rank5": r, "rank10": r, "mAP": m, "mINP": m} for r, m in ((0.2, 0.3), (0.4, 0.25))]
    replies = [Message(content=outgoing.evaluation_reply("night", MetricRecord(m)), reply_to=a)
               for a, m in zip(asked, metrics)]
    unseen = strategy.aggregate_unseen(replies, {"m1": "mall", "m2": "campus"})
    assert unseen["sites"]["night"]["model"] == "mall" and unseen["sites"]["night"]["mAP"] == 0.3
    assert unseen["sites"]["night"]["mAP-by-model"] == {"campus": 0.25, "mall": 0.3}
    assert unseen["mean"]["mAP"] == 0.3


def _style(value: float, channels: int = 8) -> ArrayRecord:
    rows = np.stack([np.full(channels, value), np.full(channels, 0.1), np.full(channels, 1.0), np.full(channels, 0.2)])
    return ArrayRecord({STYLE_KEY: Array(rows.astype(np.float32))})


def test_the_style_bank_sends_each_site_the_others_styles_and_drops_malformed_ones() -> None:
    strategy = FedPav(min_sites=3, share_styles=True)
    sent = _started(strategy, [1, 2, 3])
    assert all(STYLE_BANK_KEY not in m.content.keys() for m in sent)  # nothing shared yet
    bad = ArrayRecord({STYLE_KEY: Array(np.full((4, 8), np.nan, dtype=np.float32))})
    replies = [_reply(sent[0], _arrays([1, 1], 1), {"num-examples": 10}, "a", **{STYLE_KEY: _style(1.0)}),
               _reply(sent[1], _arrays([1, 1], 1), {"num-examples": 10}, "b", **{STYLE_KEY: _style(2.0)}),
               _reply(sent[2], _arrays([1, 1], 1), {"num-examples": 10}, "c", **{STYLE_KEY: bad})]
    arrays, _ = strategy.aggregate_train(3, replies)
    assert set(strategy.last_train.accepted) == {"a", "b", "c"}  # a malformed style costs the style, not the update
    assert sorted(strategy.styles) == ["a", "b"]
    following = {m.metadata.dst_node_id: m for m in strategy.configure_train(4, arrays, ConfigRecord(),
                                                                                 NodeList([1, 2, 3]))}
    bank_of = {n: following[n].content[STYLE_BANK_KEY][STYLE_BANK_KEY].numpy() for n in following}
    assert bank_of[1].shape == (1, 4, 8) and bank_of[1][0, 0, 0] == 2.0  # a gets b's style, not its own
    assert bank_of[2][0, 0, 0] == 1.0 and bank_of[3].shape == (2, 4, 8)


def test_a_site_shares_only_feature_statistics_far_smaller_than_an_image(tiny_sites: Path) -> None:
    """A real training message through the ClientApp's handler: the reply's style is one [4, C]
    float32 array (C = the stage's channels), the same that StyleMixer measures, and no image."""
    spec = SiteRunSpec(model=ModelSpec(backbone="resnet10", height=64, width=32), train=TrainConfig(batch_size=16),
                       style=StyleConfig(enabled=True))
    torch.manual_seed(0)
    arrays = ArrayRecord(shared_state(build_model(spec.model), spec.bn_stats))
    bank = np.stack([np.stack([np.zeros(64), np.full(64, 0.1), np.ones(64), np.full(64, 0.1)])]).astype(np.float32)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({**spec.to_flat(), "server-round": 2}),
                          STYLE_BANK_KEY: ArrayRecord({STYLE_BANK_KEY: Array(bank)})})
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={"sites-root": str(tiny_sites)})
    reply = handle("train", content, context)
    style = reply[STYLE_KEY][STYLE_KEY].numpy()
    assert list(reply[STYLE_KEY].keys()) == [STYLE_KEY] and style.shape == (4, 64) and style.dtype == np.float32
    assert check_style(style) is None and style.nbytes == 1024 < 64 * 32 * 3  # smaller than one 64x32 image
    assert reply["metrics"]["restyled-images"] > 0
    with pytest.raises(outgoing.OutgoingRefused, match="style"):  # anything else is never sent as a style
        outgoing.training_reply("x", {}, {}, ConfigRecord(), False, {}, None, {}, "float32",
                                np.zeros((64, 32, 3), dtype=np.float32))


def test_mixing_moves_the_restyled_images_statistics_towards_the_bank() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="resnet10", height=64, width=32)).train()
    bank = np.stack([np.stack([np.full(64, 5.0), np.zeros(64), np.full(64, 3.0), np.zeros(64)])]).astype(np.float32)
    seen: list[torch.Tensor] = []
    mixer = StyleMixer(model, StyleConfig(enabled=True, probability=1.0, alpha=1e-3), bank, seed=1)
    model.backbone.layer2.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))  # layer1's output
    with mixer:
        model.features(torch.rand(8, 3, 64, 32))
    restyled = seen[0]
    # lam ~ Beta(0.001, 0.001) is almost always 0 or 1: most images carry the bank's mean 5 and std 3 now
    means = restyled.mean((2, 3)).mean(1)
    assert (means - 5.0).abs().lt(0.5).sum() >= 2 and mixer.restyled == 8
    model.eval()
    with mixer:  # evaluation is never restyled
        model.features(torch.rand(2, 3, 64, 32))
    assert mixer.restyled == 8


def test_fedreid_sim_runs_synthetic_fedreid9_with_its_profile_or_a_chosen_group(fedreid9_root: Path) -> None:
    """What `fedreid-sim --federation synthetic-fedreid9` submits: all eleven sites in order with the
    profile that holds two out, or (the leave-one-site-out bench) exactly the named group."""
    from server.simulate import parse_args

    whole = parse_args(["--federation", fedreid9.FEDERATION, "--sites-root", str(fedreid9_root)])
    assert whole.profile == "fedreid9_synthetic" and whole.sites == 11
    assert whole.site_names == tuple(site_names(11, 0, fedreid9.FEDERATION))
    group = parse_args(["--federation", fedreid9.FEDERATION, "--sites-root", str(fedreid9_root),
                        "--site-names", "market", "msmt17", "cuhk01", "cuhk03"])
    assert group.sites == 4 and group.site_names == ("market", "msmt17", "cuhk01", "cuhk03")
