"""Miniatures of the nine datasets' original releases, for testing the preparers.

Each function writes tiny generated images with the release's real folder structure and naming
(and, for CUHK03, its MATLAB files) and returns what the prepared site must then hold. The images
are small coloured noise, different per person, so that they are real, decodable files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Expected:
    """What the prepared miniature must hold."""

    train_ids: int
    train_images: int
    query_images: int
    gallery_images: int
    cameras: int


def _image(path: Path, seed: int, size: tuple[int, int] = (8, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    suffix = path.suffix.lower()
    Image.fromarray(pixels).save(path, format={".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[suffix])


def truncate(path: Path) -> None:
    """Cut an image file short, as an interrupted download would."""
    path.write_bytes(path.read_bytes()[: max(10, path.stat().st_size // 3)])


def market(raw: Path) -> Expected:
    """4 train ids, 3 test ids over 6 cameras, plus junk (-1) and distractors (0000) in the gallery."""
    root, n = raw / "Market-1501-v15.09.15", 0
    for pid in (2, 7, 10, 11):
        for cam in (1, 3, 5):
            n += 1
            _image(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{n:06d}_01.jpg", n)
    for pid in (1, 4, 6):
        n += 1
        _image(root / "query" / f"{pid:04d}_c1s2_{n:06d}_00.jpg", n)
        for cam in (2, 6):
            n += 1
            _image(root / "bounding_box_test" / f"{pid:04d}_c{cam}s3_{n:06d}_02.jpg", n)
    for kind in ("0000", "-1", "0000"):
        n += 1
        _image(root / "bounding_box_test" / f"{kind}_c4s1_{n:06d}_01.jpg", n)
    return Expected(train_ids=4, train_images=12, query_images=3, gallery_images=8, cameras=6)


def duke(raw: Path) -> Expected:
    root, n = raw / "DukeMTMC-reID", 0
    for pid in (5, 9, 12):
        for cam in (1, 8):
            n += 1
            _image(root / "bounding_box_train" / f"{pid:04d}_c{cam}_f{n:07d}.jpg", n)
    for pid in (3, 13):
        n += 1
        _image(root / "query" / f"{pid:04d}_c2_f{n:07d}.jpg", n)
        n += 1
        _image(root / "bounding_box_test" / f"{pid:04d}_c7_f{n:07d}.jpg", n)
    n += 1
    _image(root / "bounding_box_test" / f"7001_c5_f{n:07d}.jpg", n)  # a gallery-only distractor id
    return Expected(train_ids=3, train_images=6, query_images=2, gallery_images=3, cameras=5)


def msmt17(raw: Path) -> Expected:
    """Cameras 1..15 (two-digit ones included); train ids 0..2 and test ids 0..1 overlap as numbers."""
    root, n = raw / "MSMT17_V1", 0
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    for pid, cams in ((0, (1, 12)), (1, (3, 15)), (2, (10, 4))):
        for cam in cams:
            n += 1
            relative = f"{pid:04d}/{pid:04d}_{n:03d}_{cam:02d}_0303morning_0015_0.jpg"
            _image(root / "train" / relative, n)
            lists["val" if cam == cams[1] and pid == 2 else "train"].append(f"{relative} {pid}")
    for pid, (qcam, gcam) in ((0, (2, 11)), (1, (14, 5))):
        for split, cam in (("query", qcam), ("gallery", gcam)):
            n += 1
            relative = f"{pid:04d}/{pid:04d}_{n:03d}_{cam:02d}_0113noon_0002_1.jpg"
            _image(root / "test" / relative, n)
            lists[split].append(f"{relative} {pid}")
    for name, lines in lists.items():
        (root / f"list_{name}.txt").write_text("\n".join(lines) + "\n")
    return Expected(train_ids=3, train_images=6, query_images=2, gallery_images=2, cameras=10)


def cuhk03(raw: Path, persons_per_pair: tuple[int, ...] = (3, 2)) -> Expected:
    """cuhk-03.mat (HDF5: pairs -> persons x 10 image cells, stored transposed, some cells empty)
    plus both new-protocol config files. Person p of pair k has 2 images per camera."""
    import h5py
    from scipy.io import savemat

    from reid.data.prepare.cuhk03 import protocol_file_name

    root = raw / "cuhk03_release"
    root.mkdir(parents=True)
    names: list[str] = []
    labels: list[int] = []
    cameras: list[int] = []
    rng = np.random.default_rng(0)
    with h5py.File(root / "cuhk-03.mat", "w") as mat:
        for variant in ("detected", "labeled"):
            pair_refs = []
            for pair, persons in enumerate(persons_per_pair):
                cells = np.empty((10, persons), dtype=h5py.ref_dtype)  # stored transposed, as MATLAB does
                for person in range(persons):
                    for image in range(10):
                        dataset_name = f"#refs#/{variant}/p{pair}/{person}/{image}"
                        if image in (0, 1, 5, 6):
                            height = 12 if variant == "detected" else 14
                            pixels = rng.integers(0, 255, (height, 6, 3), dtype=np.uint8)
                            cells[image, person] = mat.create_dataset(dataset_name, data=pixels.T).ref
                            if variant == "detected":
                                names.append(protocol_file_name(pair, person, image))
                                labels.append(len({n[:5] for n in names}))
                                cameras.append(1 if image < 5 else 2)
                        else:
                            cells[image, person] = mat.create_dataset(dataset_name, data=np.zeros(2)).ref
                pair_refs.append(mat.create_dataset(f"#refs#/{variant}/pair{pair}", data=cells).ref)
            mat.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype).T)
    labels_array = np.array(labels)
    people = sorted(set(labels))
    train_people, test_people = set(people[:3]), set(people[3:])
    index = np.arange(1, len(names) + 1)
    is_train = np.array([label in train_people for label in labels])
    is_query = np.array([label in test_people and cam == 1 for label, cam in zip(labels, cameras)])
    is_gallery = np.array([label in test_people and cam == 2 for label, cam in zip(labels, cameras)])
    for variant in ("detected", "labeled"):
        savemat(root / f"cuhk03_new_protocol_config_{variant}.mat", {
            "filelist": np.array(names, dtype=object).reshape(-1, 1), "labels": labels_array.reshape(-1, 1),
            "camId": np.array(cameras).reshape(-1, 1), "train_idx": index[is_train].reshape(-1, 1),
            "query_idx": index[is_query].reshape(-1, 1), "gallery_idx": index[is_gallery].reshape(-1, 1)})
    return Expected(train_ids=3, train_images=int(is_train.sum()), query_images=int(is_query.sum()),
                    gallery_images=int(is_gallery.sum()), cameras=2)


def cuhk01(raw: Path, persons: int = 8) -> Expected:
    for pid in range(1, persons + 1):
        for cam in range(1, 5):
            _image(raw / "campus" / f"{pid:04d}{cam:03d}.png", pid * 10 + cam)
    test = int(persons * 486 / 971 + 0.5)
    return Expected(train_ids=persons - test, train_images=4 * (persons - test), query_images=2 * test,
                    gallery_images=2 * test, cameras=2)


def viper(raw: Path, persons: int = 6) -> Expected:
    for pid in range(persons):  # VIPeR numbers people from 0
        _image(raw / "VIPeR" / "cam_a" / f"{pid:03d}_45.bmp", pid)
        _image(raw / "VIPeR" / "cam_b" / f"{pid:03d}_90.bmp", 100 + pid)
    test = persons // 2
    return Expected(train_ids=persons - test, train_images=2 * (persons - test), query_images=test,
                    gallery_images=test, cameras=2)


def prid(raw: Path, shared: int = 4, a_only: int = 2, b_only: int = 3, frames: int = 12) -> Expected:
    """PRID numbering: 1..200 are shared; miniature: 1..shared shared, then 201.. per camera."""
    root = raw / "prid_2011"
    a_people = [*range(1, shared + 1), *range(201, 201 + a_only)]
    b_people = [*range(1, shared + 1), *range(201, 201 + b_only)]
    for cam, people in (("a", a_people), ("b", b_people)):
        for person in people:
            _image(root / "single_shot" / f"cam_{cam}" / f"person_{person:04d}.png", person)
            for frame in range(1, frames + 1):
                _image(root / "multi_shot" / f"cam_{cam}" / f"person_{person:04d}" / f"{frame:04d}.png",
                       person * 100 + frame)
    test = shared // 2
    train_images = (shared - test) * 2 * min(frames, 10) + a_only * min(frames, 10)
    return Expected(train_ids=shared - test + a_only, train_images=train_images, query_images=test,
                    gallery_images=test + b_only, cameras=2)


def threedpes(raw: Path, persons: int = 6) -> Expected:
    """Every person seen from 2 views with 2 frames each: one view per pseudo-camera."""
    for pid in range(1, persons + 1):
        for view in (1, 2):
            for frame in (1, 2):
                _image(raw / "3DPeS" / "RGB" / f"{pid:03d}_{view}_{frame:04d}.bmp", pid * 10 + view * 3 + frame)
    test = int(persons * 100 / 193 + 0.5)
    return Expected(train_ids=persons - test, train_images=4 * (persons - test), query_images=2 * test,
                    gallery_images=2 * test, cameras=2)


def ilids(raw: Path, persons: int = 6) -> Expected:
    """Four images per person (i-LIDS has 2-8): two per pseudo-camera."""
    for pid in range(1, persons + 1):
        for shot in range(1, 5):
            _image(raw / "i-LIDS_Pedestrian" / "Persons" / f"{pid:04d}{shot:03d}.jpg", pid * 10 + shot)
    test = int(persons * 60 / 119 + 0.5)
    return Expected(train_ids=persons - test, train_images=4 * (persons - test), query_images=2 * test,
                    gallery_images=2 * test, cameras=2)


FABRICATORS = {"market": market, "duke": duke, "msmt17": msmt17, "cuhk03": cuhk03, "cuhk01": cuhk01,
               "viper": viper, "prid": prid, "3dpes": threedpes, "ilids": ilids}
