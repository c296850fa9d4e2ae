"""fedreid-prepare on fabricated miniatures of each dataset's original release."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reid.data.dataset import load_reid_data
from reid.data.layout import DatasetLayoutError
from reid.data.prepare import prepare
from reid.data.prepare.check import check_site
from reid.data.prepare.site_writer import OutputNotEmptyError, SiteWriter
from tests.fabricate import FABRICATORS, truncate


@pytest.mark.parametrize("name", sorted(FABRICATORS))
def test_a_miniature_release_becomes_the_site_layout_with_the_right_counts(name: str, tmp_path: Path) -> None:
    expected = FABRICATORS[name](tmp_path / "raw")
    report = prepare(name, tmp_path / "raw", tmp_path / "site")
    data = load_reid_data(tmp_path / "site", verify=True)
    assert len({s.pid for s in data.train}) == expected.train_ids
    assert (len(data.train), len(data.query), len(data.gallery)) == (
        expected.train_images, expected.query_images, expected.gallery_images)
    assert len({s.camid for split in (data.train, data.query, data.gallery) for s in split}) == expected.cameras
    assert report.counts == {"train": expected.train_images, "query": expected.query_images,
                             "gallery": expected.gallery_images}
    assert not {s.pid for s in data.train} & {s.pid for s in data.query}  # test people never train
    assert {s.pid for s in data.query} <= {s.pid for s in data.gallery}  # every query has a true match
    for query in data.query:  # ... on another camera
        assert any(g.pid == query.pid and g.camid != query.camid for g in data.gallery)
    result = check_site(tmp_path / "site")
    assert result.dataset == name and result.complete and not result.corrupt
    assert result.counts["train images"] == expected.train_images
    assert "train ids" in result.differences  # a miniature is not the published dataset


def test_market_drops_junk_keeps_distractors_and_skips_a_truncated_jpeg(tmp_path: Path) -> None:
    FABRICATORS["market"](tmp_path / "raw")
    broken = sorted((tmp_path / "raw" / "Market-1501-v15.09.15" / "bounding_box_train").iterdir())[0]
    truncate(broken)
    report = prepare("market", tmp_path / "raw", tmp_path / "site")
    assert report.corrupt == [str(broken)] and report.counts["train"] == 11
    gallery = sorted(p.name for p in (tmp_path / "site" / "gallery").iterdir())
    assert sum(name.startswith("0000_") for name in gallery) == 2
    assert not any(name.startswith("-1_") for name in gallery)
    manifest = json.loads((tmp_path / "site" / "prepare.json").read_text())
    assert manifest["junk_dropped"] == 1 and manifest["skipped_unreadable"] == [str(broken)]


def test_msmt17_keeps_two_digit_cameras_and_separates_train_and_test_ids(tmp_path: Path) -> None:
    FABRICATORS["msmt17"](tmp_path / "raw")
    prepare("msmt17", tmp_path / "raw", tmp_path / "site")
    data = load_reid_data(tmp_path / "site")
    cameras = {s.camid for split in (data.train, data.query, data.gallery) for s in split}
    assert {10, 11, 12, 14, 15} <= cameras
    assert {s.pid for s in data.train} == {1, 2, 3}  # release ids 0..2, shifted by one
    assert {s.pid for s in data.query} == {10001, 10002}  # test ids 0..1: another range


def test_a_wrong_or_partial_release_names_what_is_missing(tmp_path: Path) -> None:
    FABRICATORS["market"](tmp_path / "raw")
    for child in (tmp_path / "raw" / "Market-1501-v15.09.15" / "query").iterdir():
        child.unlink()
    (tmp_path / "raw" / "Market-1501-v15.09.15" / "query").rmdir()
    with pytest.raises(DatasetLayoutError, match="query"):
        prepare("market", tmp_path / "raw", tmp_path / "site")
    FABRICATORS["viper"](tmp_path / "vip")
    with pytest.raises(DatasetLayoutError, match="expected campus"):
        prepare("cuhk01", tmp_path / "vip", tmp_path / "site2")
    done = subprocess.run([sys.executable, "-m", "reid.data.prepare.cli", "--check", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(tmp_path / "nothing") in done.stderr and "train" in done.stderr


def test_reruns_are_idempotent_resume_a_cut_run_and_never_overwrite_foreign_files(tmp_path: Path) -> None:
    FABRICATORS["prid"](tmp_path / "raw")
    site = tmp_path / "site"
    first = prepare("prid", tmp_path / "raw", site)
    files = sorted(p.relative_to(site) for p in site.rglob("*") if p.is_file())
    again = prepare("prid", tmp_path / "raw", site)
    assert again.written == 0 and again.reused == sum(first.counts.values())
    assert sorted(p.relative_to(site) for p in site.rglob("*") if p.is_file()) == files

    # a run cut short after a few files: recognised as unfinished, and the rerun completes it
    cut = tmp_path / "cut"
    calls = {"n": 0}
    original_copy = SiteWriter.copy

    def copy_then_die(self: SiteWriter, split: str, source: Path, name: str) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        original_copy(self, split, source, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SiteWriter, "copy", copy_then_die)
        with pytest.raises(KeyboardInterrupt):
            prepare("prid", tmp_path / "raw", cut)
    assert json.loads((cut / "prepare.json").read_text()) == {"dataset": "prid", "complete": False}
    resumed = prepare("prid", tmp_path / "raw", cut)
    assert resumed.reused == 5 and resumed.written == sum(first.counts.values()) - 5
    assert sorted(p.relative_to(cut) for p in cut.rglob("*") if p.is_file()) == files

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputNotEmptyError, match="--force"):
        prepare("prid", tmp_path / "raw", foreign)
    with pytest.raises(OutputNotEmptyError, match="prid"):
        prepare("viper", tmp_path / "raw", site)  # another dataset's preparation is foreign too
    prepare("prid", tmp_path / "raw", foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "prepare.json").exists()


def test_small_dataset_splits_are_seeded_saved_and_reusable(tmp_path: Path) -> None:
    FABRICATORS["cuhk01"](tmp_path / "raw", persons=20)
    prepare("cuhk01", tmp_path / "raw", tmp_path / "a", seed=1)
    prepare("cuhk01", tmp_path / "raw", tmp_path / "b", seed=1)
    prepare("cuhk01", tmp_path / "raw", tmp_path / "c", seed=2)
    split_a = json.loads((tmp_path / "a" / "split.json").read_text())
    assert split_a == json.loads((tmp_path / "b" / "split.json").read_text())
    assert split_a["test"] != json.loads((tmp_path / "c" / "split.json").read_text())["test"]
    assert len(split_a["test"]) == 10 and not set(split_a["train"]) & set(split_a["test"])
    prepare("cuhk01", tmp_path / "raw", tmp_path / "d", seed=5, split_file=tmp_path / "a" / "split.json")
    assert json.loads((tmp_path / "d" / "split.json").read_text())["test"] == split_a["test"]
    with pytest.raises(ValueError, match="cuhk01"):
        FABRICATORS["viper"](tmp_path / "vraw")
        prepare("viper", tmp_path / "vraw", tmp_path / "e", split_file=tmp_path / "a" / "split.json")


def test_the_command_line_prepares_and_checks(tmp_path: Path) -> None:
    FABRICATORS["ilids"](tmp_path / "raw")
    command = [sys.executable, "-m", "reid.data.prepare.cli"]
    done = subprocess.run([*command, "ilids", str(tmp_path / "raw"), str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ilids ->" in done.stdout
    done = subprocess.run([*command, "--check", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "published 59" in done.stdout and "unreadable images: 0" in done.stdout
