"""A site that does not trust its server, piece by piece: model files that name code, oversized
and privacy-breaking knobs, a zip bomb for an app bundle, error replies that would carry the
site's paths, a node_config that points elsewhere, tasks past their time budget, and a disk the
server could fill. Each is tried for real on the site's own code (real files, real images, real
processes for the model tools); the same faults over a real deployment are in
test_deployment_e2e.py (a hostile SuperLink's broken app bundles, an agent-app run, 100,000 epochs,
file modes).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import time
import tracemalloc
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.nodestate import NodeStateFactory

import fedreid
from reid import backbones
from clients.answer_on_death import AnswerOnDeath
from clients.disk import fingerprint_cache, prune_newest
from clients.executor import EXIT_OVER_BUDGET, EXIT_TASK_LOST, TaskWatchdog
from clients.launch import parse_args as client_args, private_state_dir, should_restart_supernode
from clients.policy import POLICY_KEY, SitePolicy, SiteRefusal
from clients.public_errors import PublicError, public_reason
from clients.supernode import EXIT_LOOP_ENDED, LOOP_MODULE, answer_untakeable_messages
from clients.trust import APP_ID, AppPolicy, installed_version
from clients.worker import message_handler, parse_args as worker_args, site_node_config
from reid.config import SiteRunSpec
from reid.models import ModelSpec, build_model, shared_state
from reid.pruning import PruningConfig
from reid.saved_model import ModelFileError, ModelInfo, save_model
from reid.style import StyleConfig
from reid.train import TrainConfig
from reid.unsupervised import UnsupervisedConfig
from strategies.packing import pack_record

SPEC = ModelSpec(backbone="resnet10", height=64, width=32)
RUN = SiteRunSpec(model=replace(SPEC, last_stride=1), train=TrainConfig(batch_size=16, num_workers=1), bn_stats="local")
EVIL_MODULE = '''
from pathlib import Path
Path(__file__).with_name("evil-module-ran").write_text("imported")

def make():
    Path(__file__).with_name("evil-factory-ran").write_text("called")
'''


class _Touch:
    """Unpickling this writes a file: what a pickled 'factory' can do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def _crafted(folder: Path, factory: str) -> Path:
    """A real model file whose spec names ``factory``, as a hostile server's model.pt could."""
    torch.manual_seed(0)
    path = save_model(folder / f"model-{len(list(folder.glob('model-*.pt')))}.pt",
                      build_model(SPEC, num_classes=0).state_dict(), ModelInfo(spec=SPEC, algorithm="fedpav", round=1))
    payload = torch.load(path, weights_only=True)
    payload["model"].update(backbone="evilnet", backbone_factory=factory)
    payload["info"]["backbone_source"] = "registered"
    torch.save(payload, path)
    return path


@pytest.fixture()
def evil(tmp_path: Path) -> Path:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evil_backbone.py").write_text(EVIL_MODULE)
    (folder / "factory.pkl").write_bytes(pickle.dumps(_Touch(folder / "pickle-ran")))
    return folder


def test_model_files_never_run_the_code_they_name(evil: Path, tmp_path: Path, tiny_site: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(evil))
    for factory in ("evil_backbone:make", str(evil / "factory.pkl"), "faulthandler:dump_traceback"):
        path = _crafted(tmp_path, factory)
        with pytest.raises(ModelFileError) as refused:
            fedreid.load_model(path, device="cpu")
        assert str(path) in str(refused.value) and "never runs code" in str(refused.value), refused.value
    with pytest.raises(ModelFileError, match=r"allow it with --backbone-module evil_backbone"):
        fedreid.load_model(_crafted(tmp_path, "evil_backbone:make"), device="cpu")
    assert sorted(p.name for p in evil.iterdir() if "ran" in p.name) == []  # nothing was imported or unpickled
    # The operator's way out: the module allowed, its factory is used (here it returns no network).
    try:
        with pytest.raises(ModelFileError, match="cannot build backbone"):
            fedreid.load_model(_crafted(tmp_path, "evil_backbone:make"), device="cpu",
                               backbone_modules=["evil_backbone"])
    finally:
        backbones._REGISTRY.pop("evilnet", None)
    assert (evil / "evil-factory-ran").exists()

    # The three model tools, each on a file naming `signal:pause` (which would hang them): refused at once.
    hanging = _crafted(tmp_path, "signal:pause")
    tools = {"reid.apps.evaluate": ["--data", str(tiny_site)],
             "reid.apps.search": ["--query", str(tiny_site / "query"), "--gallery", str(tiny_site / "gallery"),
                                  "--out", str(tmp_path / "search.html")],
             "reid.apps.export": ["--format", "torchscript", "--out", str(tmp_path / "model.ts")]}
    for module, extra in tools.items():
        done = subprocess.run([sys.executable, "-m", module, "--model", str(hanging), "--device", "cpu", *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "never runs code" in done.stderr and str(hanging) in done.stderr, \
            (module, done.stderr[-2000:])


def test_a_round_beyond_the_sites_limits_is_refused_naming_the_flag() -> None:
    policy = SitePolicy()
    assert policy.refusal(RUN) is None
    cases = {
        "--max-epochs": replace(RUN, train=replace(RUN.train, local_epochs=100000)),
        "--max-image-side": replace(RUN, model=replace(RUN.model, height=1024, width=512)),
        "--min-batch-size": replace(RUN, train=replace(RUN.train, batch_size=2)),
        "--max-batch-size": replace(RUN, eval_batch_size=100000),
        "--require-bn-stats any": replace(RUN, bn_stats="average"),
        "--allow-style-sharing": replace(RUN, style=StyleConfig(enabled=True)),
        "--allow-style-sharing": replace(RUN, style=StyleConfig(enabled=True)),
        "at most 4": replace(RUN, eval_query_scales="0.9 0.8 0.7 0.6 0.5"),
    }
    unsupervised = replace(RUN, unsupervised=UnsupervisedConfig(enabled=True, epochs_first=500))
    cases["algorithm.unsupervised.epochs_first=500"] = unsupervised
    for flag, spec in cases.items():
        reason = policy.refusal(spec)
        assert reason is not None and flag in reason, (flag, reason)
    assert SitePolicy(require_bn_stats="any", allow_style_sharing=True).refusal(
        replace(RUN, bn_stats="average", style=StyleConfig(enabled=True))) is None
    assert policy.refusal(replace(RUN, pruning=PruningConfig(enabled=True))) is None
    with pytest.raises(SiteRefusal, match="--max-memory-fraction"):
        policy.check_memory(10**9, 256, 128)
    policy.check_memory(1000, 256, 128)


def _content(spec: SiteRunSpec, run_tag: str = "hostile-test", server_round: int = 1) -> RecordDict:
    torch.manual_seed(0)
    arrays = ArrayRecord(shared_state(build_model(spec.model), spec.bn_stats))
    config = ConfigRecord({**spec.to_flat(), "server-round": server_round, "run-tag": run_tag})
    return RecordDict({"arrays": pack_record(arrays), "config": config})


def _worker_node_config(site: Path, state: Path, *flags: str) -> dict[str, object]:
    args = worker_args(["--runtime-api", "127.0.0.1:1", "--secret-file", "s", "--state-dir", str(state), "--site",
                        "mall", "--data-root", str(site), *flags])
    return site_node_config(args, SitePolicy.from_args(args))


def _message(kind: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=7, message_type=kind)


def test_the_worker_runs_every_task_under_its_own_command_line_not_the_tasks_node_config(
        tiny_site: Path, tmp_path: Path) -> None:
    """A task whose node_config names another data root, allows every module and drops the data
    root's checks is run with the worker's own: its site, its limits (100,000 epochs refused at once)."""
    handler = message_handler(_worker_node_config(tiny_site, tmp_path / "state"))
    foreign = Context(run_id=11, node_id=7, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "allow-modules": "os subprocess"})
    assert dict(handler(_message("query", RecordDict()), foreign)["site"]) == {"name": "mall"}
    assert foreign.node_config["data-root"] == str(tiny_site.resolve()) and POLICY_KEY in foreign.node_config
    started = time.monotonic()
    with pytest.raises(SiteRefusal, match="train.local_epochs=100000 exceeds this site's limit of 20"):
        handler(_message("train", _content(replace(RUN, train=replace(RUN.train, local_epochs=100000)))), foreign)
    assert time.monotonic() - started < 30  # refused before any training


def test_disk_use_is_bounded_whatever_run_tags_and_image_sizes_the_server_sends(tiny_site: Path,
                                                                               tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(tiny_site, site)
    state = tmp_path / "state"
    handler = message_handler(_worker_node_config(site, state, "--keep-runs", "2"))
    for index, height in enumerate((64, 80, 96, 64)):  # four run tags, three image sizes
        spec = replace(RUN, model=replace(RUN.model, height=height, width=height // 2))
        context = Context(run_id=20 + index, node_id=7, state=RecordDict(), run_config={}, node_config={})
        handler(_message("evaluate", _content(spec, run_tag=f"run-{index}")), context)
    assert sorted(p.name for p in (state / "models").glob("*.pt")) == ["run-2.pt", "run-3.pt"]
    (cache,) = (state / "image-cache").iterdir()  # one folder: the data as it is now
    assert len(list(cache.glob("*.pt"))) <= 6
    shutil.copy(next((site / "train").glob("*.jpg")), site / "train" / "0999_c1s1_000001_00.jpg")
    handler(_message("evaluate", _content(RUN, run_tag="run-4")),
            Context(run_id=30, node_id=7, state=RecordDict(), run_config={}, node_config={}))
    (after,) = (state / "image-cache").iterdir()
    assert after != cache  # the changed folder's images replaced the old cache
    # A disk below the operator's floor: the site refuses the round and writes nothing.
    floor = shutil.disk_usage(state).free / 1e6 + 1000
    handler = message_handler(_worker_node_config(site, state, "--min-free-mb", str(floor)))
    before = sorted(p.name for p in state.rglob("*"))
    with pytest.raises(SiteRefusal, match="keeps at least .* MB free \\(--min-free-mb\\)"):
        handler(_message("evaluate", _content(RUN, run_tag="run-5")),
                Context(run_id=31, node_id=7, state=RecordDict(), run_config={}, node_config={}))
    assert sorted(p.name for p in state.rglob("*")) == before


def test_pruning_keeps_the_newest_and_the_current_and_one_cache_per_fingerprint(tmp_path: Path) -> None:
    files = []
    for index in range(5):
        file = tmp_path / f"{index}.state"
        file.write_text(str(index))
        os.utime(file, ns=(index * 10**9, index * 10**9))
        files.append(file)
    removed = prune_newest(files, 2, current={files[0]})
    assert sorted(p.name for p in tmp_path.glob("*.state")) == ["0.state", "3.state", "4.state"]
    assert sorted(p.name for p in removed) == ["1.state", "2.state"]
    root = tmp_path / "cache"
    old = fingerprint_cache(root, "a" * 64)
    (old / "images-1.pt").write_bytes(b"x")
    (root / "images-legacy.pt").write_bytes(b"x")
    new = fingerprint_cache(root, "b" * 64)
    assert list(root.iterdir()) == [new]


def test_an_app_bundle_is_checked_with_bounded_memory(tmp_path: Path) -> None:
    """A zip bomb (100 MB of one byte in a site package entry, 100 KB compressed) is refused after
    reading a bounded part of it; a FAB that is not a zip or has invalid TOML is refused with a reason."""
    policy = AppPolicy(site="mall")
    version = installed_version()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pyproject.toml", '[tool.flwr.app.components]\nclientapp = "clients.app:app"\n')
        archive.writestr("clients/app.py", b" " * 100_000_000)
    bomb = buffer.getvalue()
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    reason = policy.refusal(APP_ID, version, "ab" * 32, bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reason is not None and "refused unread" in reason and "decompresses more than 200:1" in reason, reason
    assert peak < 16_000_000, peak
    assert "cannot be read (BadZipFile)" in policy.refusal(APP_ID, version, "cd" * 32, b"not a zip")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", "[tool.flwr\n= broken")
    assert "cannot be read (TOMLDecodeError)" in policy.refusal(APP_ID, version, "ef" * 32, buffer.getvalue())


def test_an_app_hash_pin_with_the_submitted_app_mode_is_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--server", "x:1", "--dataset", "mall", "--data-root", "/nowhere", "--insecure"]
    assert client_args([*base, "--allow-app-hash", "ab" * 32]).allow_app_hash == ["ab" * 32]
    with pytest.raises(SystemExit) as refused:
        client_args([*base, "--run-submitted-app", "--allow-app-hash", "ab" * 32])
    assert refused.value.code == 2 and "cannot be enforced with --run-submitted-app" in capsys.readouterr().err


def test_error_replies_carry_a_fixed_class_and_no_site_data() -> None:
    leaky = [OSError(2, "No such file", "/srv/cameras/mall/train/0042_c3s2_000151_01.jpg"),
             ValueError("cannot identify image file '/data/mall/train/0042_c3s2_000151_01.jpg'"),
             RuntimeError("state folder /home/ops/fedreid-state/mall is full"),
             KeyError("0042_c3s2_000151_01.jpg")]
    for error in leaky:
        reason = public_reason(error)
        assert reason.startswith("<class 'fedreid.Site") and "details are in the site's log" in reason
        assert "/" not in reason.split(">:<", 1)[1] and "0042" not in reason and "mall" not in reason, reason
    refusal = public_reason(SiteRefusal("train.local_epochs=9 exceeds this site's limit (--max-epochs)"))
    assert refusal == "<class 'fedreid.SiteRefusal'>:<'train.local_epochs=9 exceeds this site's limit (--max-epochs)'>"
    assert "<path>" in public_reason(PublicError("cannot write /var/lib/site/x.state"))


def test_a_task_past_its_budget_or_given_up_by_the_supernode_ends_the_worker(tmp_path: Path) -> None:
    record = AnswerOnDeath(tmp_path)
    record.arm("token", b"died", 1, 7, over_budget_reply=b"over budget", deadline=time.time() + 0.2)
    ended: list[int] = []
    watchdog = TaskWatchdog(record, 0.2, ended.append)
    watchdog.start()
    deadline = time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended == [EXIT_OVER_BUDGET]
    assert record.reply(record.saved()) == b"over budget"  # what the next worker answers
    assert record.overdue(time.time() + 31, grace=30) and not record.overdue(time.time(), grace=30)
    record.arm("token", b"died", 1, 7)
    TaskWatchdog(record, None, ended.append).lost()
    assert ended[-1] == EXIT_TASK_LOST and record.saved() is None  # nobody waits for that answer
    answering = TaskWatchdog(record, None, ended.append)
    answering.cancel()  # the work is done and the reply on its way: a heartbeat that finds the task gone is no loss
    answering.lost()
    assert len(ended) == 2
    assert should_restart_supernode(EXIT_LOOP_ENDED) and should_restart_supernode(-9) and not should_restart_supernode(1)


def test_the_state_folder_is_private(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert private_state_dir(folder).stat().st_mode & 0o777 == 0o700
    assert private_state_dir(tmp_path / "new").stat().st_mode & 0o777 == 0o700


def _bad_toml() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", "[tool.flwr.app\n= not toml")
    return buffer.getvalue()


@pytest.mark.parametrize("fab, error", [(b"this is not a zip archive", "BadZipFile"), (_bad_toml(), "ValueError")])
def test_the_supernode_answers_a_message_whose_app_bundle_it_cannot_read_and_goes_on(
        fab: bytes, error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own receive step (``_pull_and_store_message``) on a real node state: it raises on the
    bundle, which would end the SuperNode's loop; with clients/supernode.py's guard the message gets
    an error reply that the loop pushes, and the step returns as after any message."""
    loop = importlib.import_module(LOOP_MODULE)
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)  # undone after the test
    before = TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 7  # as a task's process has them
    try:
        _answer_untakeable(loop, fab, error)
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = before


def _answer_untakeable(loop, fab: bytes, error: str) -> None:  # noqa: ANN001 - Flower's loop module
    stores = ObjectStoreFactory()
    state, store = NodeStateFactory(stores).state(), stores.store()
    state.set_node_id(7)
    message = Message(RecordDict(), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id

    def step() -> int | None:
        return loop._pull_and_store_message(
            state=state, object_store=store, node_config={}, receive=lambda: (message, get_object_tree(message)),
            get_run=lambda run_id: Run.create_empty(run_id), get_fab=lambda digest, run_id: Fab(digest, fab, {}),
            pull_object=lambda run_id, object_id: b"", confirm_message_received=lambda run_id, message_id: None,
            trusted_entities=None)

    with pytest.raises(Exception):  # Flower as it is: the loop would end here
        step()
    answer_untakeable_messages(loop)
    assert step() == 42
    (reply,) = state.get_messages(is_reply=True)
    assert reply.metadata.reply_to_message_id == message.object_id and reply.has_error()
    assert reply.error.reason == f"site refused a train message of run 42: its app bundle could not be read ({error})"


def test_a_run_every_site_refused_ends_with_its_files_written(tmp_path: Path) -> None:
    """A hostile (or misconfigured) run whose every site refuses: the ServerApp once crashed at its
    end (a mean over no sites); it writes its table and ends normally."""
    from server.outputs import RunOutputs, format_table

    outputs = RunOutputs(tmp_path)
    refused = {"sites": {}, "rejected": {"mall": "SiteRefusal"}, "failed": []}
    outputs.append_round({"round": 1, "train": refused, "evaluate": refused})
    assert outputs.write_table({}) == "No evaluation was completed.\n"
    assert (tmp_path / "results.md").read_text() == "No evaluation was completed.\n"
    assert "| mean" not in format_table(1, {}, {}) and "**mean**" in format_table(1, {"mall": {"mAP": 0.5}}, {})
