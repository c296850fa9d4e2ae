"""A site's runtime on its own: what its Site keeps between messages, which apps and knobs it
accepts (real FABs built by Flower from this project), what it refuses to send, and the Flower
runtime API its worker relies on under the flwr==1.39.* pin.

The worker taking real tasks from a real SuperNode is tested end to end in test_deployment_e2e.py.
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
import shutil
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.cli.build import build_fab_from_disk

import clients.site
import reid.data.tensor_cache
from clients.app import handle
from clients.answer_on_death import AnswerOnDeath
from clients.executor import FLOWER_RUNTIME_API
from clients.kept import LOCAL_STATE_KEY
from clients.outgoing import OutgoingRefused, check_shared, metric_record
from clients.trust import APP_ID, ALLOWED_MODULES_KEY, AppPolicy, ForbiddenKnob, installed_version
from reid.config import SiteRunSpec
from reid.models import ModelSpec, build_model, shared_state
from reid.train import TrainConfig
from strategies.packing import pack_record

REPO = Path(__file__).resolve().parent.parent
SPEC = SiteRunSpec(model=ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32),
                   train=TrainConfig(batch_size=16, num_workers=1), bn_stats="local")


def _content(server_round: int, spec: SiteRunSpec = SPEC) -> RecordDict:
    torch.manual_seed(0)
    arrays = ArrayRecord(shared_state(build_model(spec.model), spec.bn_stats))
    config = ConfigRecord({**spec.to_flat(), "server-round": server_round, "run-tag": "runtime-test"})
    return RecordDict({"arrays": pack_record(arrays), "config": config})


def _context(site: Path, state_dir: Path, **node_config: str) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                   node_config={"data-root": str(site), "dataset": "tiny-site", "state-dir": str(state_dir),
                                **node_config})


@pytest.fixture()
def site_copy(tiny_site: Path, tmp_path: Path) -> Path:
    """A site of its own: no scan or decode of another test can be reused for it."""
    site = tmp_path / "site"
    shutil.copytree(tiny_site, site)
    return site


def test_a_site_scans_and_decodes_once_and_keeps_only_state_in_context(site_copy: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    scans, decodes = [], []
    scan, decode = clients.site.load_reid_data, reid.data.tensor_cache.decode_images
    monkeypatch.setattr(clients.site, "load_reid_data", lambda *a, **k: scans.append(a) or scan(*a, **k))
    monkeypatch.setattr(reid.data.tensor_cache, "decode_images", lambda *a, **k: decodes.append(a) or decode(*a, **k))
    context = _context(site_copy, tmp_path / "state")
    handle("train", _content(1), context)
    handle("evaluate", _content(1), context)
    handle("train", _content(2), context)
    assert len(scans) == 1 and len(decodes) == 3  # one scan; train, query and gallery decoded once each
    assert set(context.state.keys()) == {LOCAL_STATE_KEY}  # what it keeps is in the state it was given
    assert [p.name for p in (tmp_path / "state").glob("*.state")] == ["runtime-test.state"]  # and on its disk

    extra = next((site_copy / "train").glob("*.jpg"))  # a file added: the folder is scanned again
    shutil.copy(extra, extra.with_name("0999_c1s1_000001_00.jpg"))
    handle("evaluate", _content(2), context)
    assert len(scans) == 2


def test_a_deployed_site_imports_only_backbone_factories_its_operator_allowed(site_copy: Path,
                                                                              tmp_path: Path) -> None:
    own_net = "tests.test_backbones:VectorNet"
    factory = replace(SPEC, model=replace(SPEC.model, backbone="vec", backbone_factory=own_net))
    with pytest.raises(ForbiddenKnob, match="has not allowed module 'tests.test_backbones'.*--allow-module tests"):
        handle("evaluate", _content(1, factory), _context(site_copy, tmp_path / "a"))
    pickled = replace(factory, model=replace(factory.model, backbone_factory=str(tmp_path / "net.pkl")))
    with pytest.raises(ForbiddenKnob, match="pickled factory"):  # refused before the file is even looked for
        handle("evaluate", _content(1, pickled), _context(site_copy, tmp_path / "b", **{ALLOWED_MODULES_KEY: "tests"}))
    allowed = handle("evaluate", _content(1, factory), _context(site_copy, tmp_path / "c",
                                                                **{ALLOWED_MODULES_KEY: "numpy tests"}))
    assert allowed["metrics"]["num-queries"] > 0


# -- which apps a site accepts ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fab() -> bytes:
    """The FAB `flwr run .` submits for this very checkout."""
    return build_fab_from_disk(REPO)


def _rewritten(fab: bytes, changes: dict[str, bytes | None]) -> bytes:
    """The FAB with some members replaced or added (or, for None, left out)."""
    source, out = zipfile.ZipFile(io.BytesIO(fab)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            if name not in changes:
                target.writestr(name, source.read(name))
        for name, content in changes.items():
            if content is not None:
                target.writestr(name, content)
    return out.getvalue()


def _refusal(policy: AppPolicy, fab: bytes, fab_id: str = APP_ID, version: str | None = None,
             fab_hash: str | None = None) -> str | None:
    import hashlib

    return policy.refusal(fab_id, version or installed_version(), fab_hash or hashlib.sha256(fab).hexdigest(), fab)


def test_the_installed_fedreid_is_accepted_and_anything_else_refused_with_the_reason(fab: bytes) -> None:
    policy = AppPolicy(site="mall")
    assert _refusal(policy, fab) is None
    member = zipfile.ZipFile(io.BytesIO(fab))
    app_code = member.read("clients/app.py")
    stealing = _rewritten(fab, {"clients/app.py": app_code + b"\nSTOLEN = open('/etc/hostname').read()\n"})
    reason = _refusal(policy, stealing)
    assert reason is not None and "site 'mall' refused app fedreid/fedreid" in reason
    assert "site code differs from the installed one in clients/app.py" in reason
    assert f"runs only fedreid {installed_version()} as installed" in reason and "never runs here" in reason
    assert "lacks site code" in str(_refusal(policy, _rewritten(fab, {"reid/metrics.py": None})))
    added = _rewritten(fab, {"clients/extra.py": b"print('hello')\n"})
    assert "clients/extra.py" in str(_refusal(policy, added))
    other_clientapp = member.read("pyproject.toml").replace(b'clientapp = "clients.app:app"', b'clientapp = "x:app"')
    other_project = _rewritten(fab, {"pyproject.toml": other_clientapp})
    assert "names 'x:app' as its ClientApp" in str(_refusal(policy, other_project))
    assert "is not fedreid/fedreid" in str(_refusal(policy, fab, fab_id="someone/echo"))
    assert "version 9.9.9, the site has" in str(_refusal(policy, fab, version="9.9.9"))
    assert "cannot be read" in str(_refusal(policy, b"not a zip"))
    server_only = _rewritten(fab, {"server/app.py": member.read("server/app.py") + b"\n# the server's business\n"})
    assert _refusal(policy, server_only) is None  # code only the server runs may differ


def test_pinned_app_hashes_admit_only_those_fabs(fab: bytes) -> None:
    import hashlib

    digest = hashlib.sha256(fab).hexdigest()
    assert _refusal(AppPolicy(site="mall", allowed_hashes=frozenset({digest})), fab) is None
    pinned_elsewhere = AppPolicy(site="mall", allowed_hashes=frozenset({"0" * 64}))
    assert "not one the site's operator pinned with --allow-app-hash" in str(_refusal(pinned_elsewhere, fab))
    assert "only FAB 000000000000" in pinned_elsewhere.describe()


# -- what a site refuses to send -------------------------------------------------------------------

def test_a_reply_carries_only_documented_finite_numbers_and_the_declared_arrays() -> None:
    assert metric_record({"mAP": 0.5, "mAP@0.25": 0.1, "num-examples": 12})["num-examples"] == 12
    with pytest.raises(OutgoingRefused, match="'image-bytes' is not one a site reports"):
        metric_record({"image-bytes": 3.0})
    with pytest.raises(OutgoingRefused, match="finite number"):
        metric_record({"mAP": math.nan})
    with pytest.raises(OutgoingRefused, match="finite number"):
        metric_record({"mAP": True})
    declared = {"a": (2, 3)}
    check_shared({"a": torch.zeros(2, 3)}, declared)
    with pytest.raises(OutgoingRefused, match="extra \\['stolen'\\]"):
        check_shared({"a": torch.zeros(2, 3), "stolen": torch.zeros(5)}, declared)
    with pytest.raises(OutgoingRefused, match="shape \\(6,\\), declared \\(2, 3\\)"):
        check_shared({"a": torch.zeros(6)}, declared)


def test_a_task_in_progress_is_recorded_for_the_next_worker_owner_only(tmp_path: Path) -> None:
    record = AnswerOnDeath(tmp_path)
    assert record.phase() is None
    record.arm("token", b"\x00reply bytes", 1, 7)
    assert record.phase() == AnswerOnDeath.RUNNING and record.path.stat().st_mode & 0o077 == 0
    assert record.reply(record.saved() or {}) == b"\x00reply bytes"
    record.mark_replying()
    assert record.phase() == AnswerOnDeath.REPLYING
    record.disarm()
    assert record.phase() is None


# -- the SuperNode's waits ------------------------------------------------------------------------

def test_the_supernode_loop_wakes_at_the_poll_interval_and_keeps_every_other_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's fixed 3 s idle wait and 0.5 s reply check become --poll-interval (less the time the
    empty pull itself took) and a fifth of it; any other sleep, and the rest of the time module, is Flower's own."""
    from clients import supernode

    loop = supernode.check_flower_api()  # the pinned Flower still has both waits where we expect them
    monkeypatch.setattr(loop, "time", loop.time)  # put Flower's own back after the test
    paced = supernode.pace(0.1)
    assert loop.time is paced and (paced.idle_s, paced.reply_s) == (0.1, supernode.MIN_POLL_S)
    slept: list[float] = []
    now = [100.0]

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    monkeypatch.setattr(paced, "_real", type("Clock", (), {"sleep": staticmethod(sleep), "time": time.time,
                                                           "monotonic": staticmethod(lambda: now[0])})())
    paced._woke = now[0]
    for seconds in (3, 0.2):
        now[0] += 0.02  # the pull before each sleep took 0.02 s: the idle wait is what is left of 0.1 s
        loop.time.sleep(seconds)
    now[0] += 1.0  # a pull the SuperLink held for a second (server/long_polls.py): no idle wait on top
    loop.time.sleep(3)
    assert slept == [0.08, 0.2, 0.0]
    assert abs(loop.time.time() - time.time()) < 1.0
    with pytest.raises(ValueError, match="below"):
        supernode.pace(0.01)
    assert supernode.split_poll_interval(["--superlink", "a:1", "--poll-interval", "0.5", "--insecure"]) == (
        0.5, ["--superlink", "a:1", "--insecure"])
    assert supernode.split_poll_interval(["--poll-interval=2"]) == (2.0, [])
    assert supernode.split_poll_interval([])[0] == supernode.DEFAULT_POLL_S


def test_the_supernodes_reply_check_looks_again_as_soon_as_an_object_is_stored() -> None:
    """Flower's 0.5 s reply check (waiting for the worker's reply and each of its objects) lasts the
    reply interval at most, and ends as soon as the object store's put rings (server/long_polls.py)."""
    import threading

    from clients import supernode
    from server.long_polls import Bell

    stored = Bell()
    paced = supernode.PacedTime(idle_s=0.25, reply_s=0.4, stored=stored)
    started = time.monotonic()
    paced.sleep(0.5)  # nothing stored: the whole reply interval
    assert 0.35 <= time.monotonic() - started < 1.5
    threading.Timer(0.05, stored.ring).start()
    started = time.monotonic()
    paced.sleep(0.5)  # a put 0.05 s in: the check ends then
    assert time.monotonic() - started < 0.3
    stored.ring()  # a put between the last look and this wait: no wait at all
    started = time.monotonic()
    paced.sleep(0.5)
    assert time.monotonic() - started < 0.05


def test_the_supernode_asks_again_for_arrays_still_on_their_way_within_a_fraction_of_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message whose arrays the SuperLink does not have yet (the server stores the message first):
    Flower backs off 1 s, doubling; the SuperNode started by fedreid-client asks again after 0.05 s."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from clients import supernode

    loop = supernode.check_flower_api()
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)  # Flower's own back after the test
    asked: list[float] = []

    def pull_object(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < 3:  # not there yet, twice
            raise ObjectUnavailableError(object_id)
        return b"chunk"

    supernode.pull_arrays_promptly(loop)
    start = time.monotonic()
    assert loop.pull_objects(["a"], pull_object_fn=pull_object) == {"a": b"chunk"}
    assert len(asked) == 3 and time.monotonic() - start < 0.5  # Flower's own: 1 s + 2 s


# -- the Flower runtime API the worker relies on -------------------------------------------------

@pytest.mark.parametrize("name", sorted(FLOWER_RUNTIME_API))
def test_flowers_runtime_api_is_what_the_site_worker_was_written_against(name: str) -> None:
    module_name, _, attribute = name.rpartition(".")
    pin = "flwr==1.39.*: clients/executor.py relies on it; check the new Flower's run_clientapp.py and run_superexec.py"
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"Flower's runtime API changed under the pin: {name} is gone ({error}); {pin}")
    for part in FLOWER_RUNTIME_API[name]:
        if inspect.isfunction(target):
            present = part in inspect.signature(target).parameters
        elif hasattr(target, "DESCRIPTOR"):  # a protobuf message: its fields
            present = part in target.DESCRIPTOR.fields_by_name
        else:
            present = hasattr(target, part)
        assert present, f"Flower's runtime API changed under the pin: {name} has no {part!r}; {pin}"


def test_a_task_whose_message_the_supernode_abandoned_ends_instead_of_waiting_for_ever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from clients import executor

    monkeypatch.setattr(executor, "ABANDONED_CHECK_S", 0.0)
    pending: list[int] = [7]  # only this task itself: the SuperNode is still receiving its message
    abandoned = executor.AbandonedTask(lambda: pending, task_id=7)
    assert not abandoned()
    pending.append(8)  # a newer task: the SuperNode moved on, this message's parts will never come
    assert abandoned()
    monkeypatch.setattr(executor, "ABANDONED_CHECK_S", 60.0)
    rate_limited = executor.AbandonedTask(lambda: [8], task_id=7)
    assert rate_limited() and not rate_limited()  # asks the SuperNode at most once per interval
