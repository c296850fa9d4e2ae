"""The Market-style reader on generated folders: junk, distractors, cameras, corrupt files, bad layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from reid.data.dataset import ImageDataset, load_reid_data
from reid.data.layout import DatasetLayoutError, parse_name, scan_split
from reid.data.transforms import test_transform as eval_transform


def _write(folder: Path, name: str, size: tuple[int, int] = (32, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def _site(root: Path) -> Path:
    """train: 2 ids over cameras 1, 2 and 12; query 1 image; gallery: match, distractor, junk."""
    for name in ["0001_c1s1_000010_01.jpg", "0001_c12s3_000020_01.jpg", "0002_c2s1_000030_01.jpg",
                 "0002_c2s1_000040_02.jpg", "-1_c1s1_000050_01.jpg"]:
        _write(root / "train", name)
    _write(root / "query", "0007_c1s1_000100_01.jpg")
    for name in ["0007_c3s1_000200_01.jpg", "0007_c1s1_000210_01.jpg", "0000_c2s1_000300_01.jpg",
                 "-1_c4s1_000400_01.jpg"]:
        _write(root / "gallery", name)
    return root


def test_parse_name_handles_junk_and_multi_digit_cameras() -> None:
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_name("-1_c3s2_000100_01.jpg") == (-1, 3)
    assert parse_name("1041_c15s4_012345_00.jpg") == (1041, 15)
    assert parse_name("0005_c2_f0046985.jpg") == (5, 2)  # DukeMTMC naming
    assert parse_name("Thumbs.jpg") is None


def test_reader_drops_junk_keeps_distractors_and_reads_cameras(tmp_path: Path) -> None:
    data = load_reid_data(_site(tmp_path / "site"))
    assert sorted((s.pid, s.camid) for s in data.train) == [(1, 1), (1, 12), (2, 2), (2, 2)]
    assert data.reports["train"].junk == 1
    assert data.train_pids == [1, 2]
    gallery = sorted((s.pid, s.camid) for s in data.gallery)
    assert gallery == [(0, 2), (7, 1), (7, 3)]  # distractor 0000 kept, junk -1 dropped
    assert data.reports["gallery"].junk == 1
    assert [(s.pid, s.camid) for s in data.query] == [(7, 1)]


def test_training_labels_are_relabelled_in_pid_order(tmp_path: Path) -> None:
    data = load_reid_data(_site(tmp_path / "site"))
    dataset = ImageDataset.for_training(data, eval_transform(64, 32))
    assert sorted(set(dataset.targets)) == [0, 1]
    image, label, cam = dataset[[s.pid for s in data.train].index(2)]
    assert label == 1 and cam == 2 and tuple(image.shape) == (3, 64, 32)


def test_market_folder_names_are_accepted(tmp_path: Path) -> None:
    root = _site(tmp_path / "market")
    (root / "train").rename(root / "bounding_box_train")
    (root / "gallery").rename(root / "bounding_box_test")
    data = load_reid_data(root)
    assert len(data.train) == 4 and len(data.gallery) == 3


def test_corrupt_and_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _site(tmp_path / "site")
    good = root / "train" / "0001_c1s1_000010_01.jpg"
    truncated = root / "train" / "0002_c2s1_000060_03.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "gallery" / "0007_c2s1_000500_01.jpg").write_bytes(b"not an image at all")
    data = load_reid_data(root)
    assert data.num_corrupt == 2
    assert [p.name for p in data.reports["train"].corrupt] == [truncated.name]
    assert len(data.train) == 4 and len(data.gallery) == 3
    assert "2 corrupt" not in data.summary() and "1 corrupt" in data.summary()


def test_badly_named_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _site(tmp_path / "site")
    _write(root / "train", "holiday_photo.jpg")
    (root / "train" / "notes.txt").write_text("ignored: not an image")
    scan = scan_split(root, "train")
    assert [p.name for p in scan.unparsed] == ["holiday_photo.jpg"]
    assert len(scan.samples) == 4


def test_missing_folder_names_the_path_and_the_layout(tmp_path: Path) -> None:
    root = _site(tmp_path / "site")
    shutil.rmtree(root / "query")
    with pytest.raises(DatasetLayoutError) as error:
        load_reid_data(root)
    message = str(error.value)
    assert str(root / "query") in message and "expected a Market-1501-style layout" in message


def test_missing_root_and_empty_split_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_reid_data(tmp_path / "nowhere")
    root = _site(tmp_path / "site")
    for path in (root / "gallery").iterdir():
        path.unlink()
    with pytest.raises(DatasetLayoutError, match="holds no usable images"):
        load_reid_data(root)


def test_reader_on_a_generated_synthetic_site(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site)
    assert data.num_train_ids == 8 and data.num_corrupt == 0
    assert {s.pid for s in data.query} <= {s.pid for s in data.gallery}
    assert not {s.pid for s in data.train} & {s.pid for s in data.query}  # test ids are unseen in training
    assert any(s.pid == 0 for s in data.gallery) and data.reports["gallery"].junk == 2
