"""The five small benchmark datasets, with seeded identity splits saved as ``split.json``.

Their releases have no fixed train/test split; the FedReID benchmark uses the Domain-Guided-Dropout
splits, which were never published. Here a seeded split with the benchmark's sizes is drawn,
saved to ``<out>/split.json`` and reused by ``--split FILE``, so a split can be reproduced and
shared. Test identities: query = one camera, gallery = the other, plus gallery-only identities
where the dataset has them. Ids are shifted by +1 where the release numbers a person 0.

- CUHK01 ``campus/PPPPCCC.png`` (971 ids, cameras 1-2 = view A, 3-4 = view B): 485 train / 486 test.
- VIPeR ``cam_a/*.bmp``, ``cam_b/*.bmp`` (``<pid>_<angle>.bmp``, 632 ids): 316 / 316.
- PRID2011 ``single_shot/cam_{a,b}/person_NNNN.png`` and ``multi_shot/cam_{a,b}/person_NNNN/*.png``:
  persons 1-200 appear in both cameras, cam_a 201-385 and cam_b 201-749 are other people. 100 of the
  shared ids are tested (single-shot cam_a query, cam_b gallery plus the 549 cam_b-only people);
  training uses the other 100 shared ids and the 185 cam_a-only ids, with at most 10 seeded frames
  per camera from the multi-shot sequences, as the FedReID benchmark does.
- 3DPeS ``RGB/<pid>_<view>_*.bmp`` (193 ids): each person's views are split at random into two
  pseudo-cameras; 100 test / 93 train ids.
- i-LIDS (the 119-person image set) ``Persons/PPPPCCC.jpg``: each person's images are split at random
  into two pseudo-cameras; 60 test / 59 train ids.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from reid.data.layout import DatasetLayoutError
from reid.data.prepare.big import find_root, list_images
from reid.data.prepare.site_writer import SiteWriter, market_name

SPLIT_FILE = "split.json"
PRID_FRAMES_PER_CAMERA = 10


# share of identities tested, as in the benchmark (486 of 971, 316 of 632, 100 of 193, 60 of 119,
# 100 of PRID's 200 shared people); a smaller release (a test miniature) keeps the proportion
TEST_SHARE = {"cuhk01": 486 / 971, "viper": 316 / 632, "3dpes": 100 / 193, "ilids": 60 / 119, "prid": 100 / 200}


def choose_split(dataset: str, ids: list[int], seed: int, split_file: Path | None,
                 out: Path) -> tuple[set[int], set[int]]:
    """(train ids, test ids): from ``split_file`` when given, else a seeded draw; saved to out/split.json."""
    num_test = int(len(ids) * TEST_SHARE[dataset] + 0.5)
    if split_file is not None:
        saved = json.loads(split_file.read_text())
        if saved.get("dataset") != dataset:
            raise ValueError(f"{split_file} is a split of {saved.get('dataset')!r}, not {dataset!r}")
        train, test = set(saved["train"]), set(saved["test"])
        unknown = (train | test) - set(ids)
        if unknown:
            raise ValueError(f"{split_file} names ids this release does not have, e.g. {sorted(unknown)[:5]}")
    else:
        if not 0 < num_test < len(ids):
            raise DatasetLayoutError(f"{dataset}: {len(ids)} identities found; too few for a train/test split")
        shuffled = sorted(ids)
        random.Random(seed).shuffle(shuffled)
        test, train = set(shuffled[:num_test]), set(shuffled[num_test:])
        seed_used: int | None = seed
    record = {"dataset": dataset, "seed": None if split_file else seed_used,
              "from_file": str(split_file) if split_file else None, "train": sorted(train), "test": sorted(test)}
    out.mkdir(parents=True, exist_ok=True)
    (out / SPLIT_FILE).write_text(json.dumps(record) + "\n")
    return train, test


def _write_two_cameras(writer: SiteWriter, by_id: dict[int, dict[int, list[Path]]], train: set[int],
                       test: set[int]) -> None:
    """Train: every image of train ids. Test ids: camera 1 -> query, camera 2 -> gallery."""
    index = 0
    for pid in sorted(by_id):
        for cam in sorted(by_id[pid]):
            for path in by_id[pid][cam]:
                index += 1
                name = market_name(pid, cam, index, path.suffix)
                if pid in train:
                    writer.copy("train", path, name)
                elif pid in test:
                    writer.copy("query" if cam == 1 else "gallery", path, name)


def _split_views_in_two(groups: dict[str, list[Path]], rng: random.Random) -> dict[int, list[Path]]:
    """Half of a person's views (or images) to pseudo-camera 1, the rest to 2 (seeded)."""
    keys = sorted(groups)
    rng.shuffle(keys)
    half = (len(keys) + 1) // 2
    cameras: dict[int, list[Path]] = defaultdict(list)
    for position, key in enumerate(keys):
        cameras[1 if position < half else 2].extend(sorted(groups[key]))
    return dict(cameras)


def prepare_cuhk01(raw: Path, writer: SiteWriter, seed: int = 0, split_file: Path | None = None,
                   **_: Any) -> dict[str, Any]:
    root = find_root(raw, ("campus",), ("CUHK01", "cuhk01"))
    by_id: dict[int, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in list_images(root / "campus"):
        stem = path.stem
        if len(stem) != 7 or not stem.isdigit():
            raise DatasetLayoutError(f"{path}: CUHK01 names are PPPPCCC (4-digit person, 3-digit camera)")
        by_id[int(stem[:4])][(int(stem[4:]) - 1) // 2 + 1].append(path)
    train, test = choose_split("cuhk01", list(by_id), seed, split_file, writer.out)
    _write_two_cameras(writer, by_id, train, test)
    return {"source": str(root), "seed": seed}


def prepare_viper(raw: Path, writer: SiteWriter, seed: int = 0, split_file: Path | None = None,
                  **_: Any) -> dict[str, Any]:
    root = find_root(raw, ("cam_a", "cam_b"), ("VIPeR", "viper"))
    by_id: dict[int, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for cam, folder in ((1, "cam_a"), (2, "cam_b")):
        for path in list_images(root / folder):
            head = path.stem.split("_")[0]
            if not head.isdigit():
                raise DatasetLayoutError(f"{path}: VIPeR names are <pid>_<angle>.bmp")
            by_id[int(head) + 1][cam].append(path)
    train, test = choose_split("viper", list(by_id), seed, split_file, writer.out)
    _write_two_cameras(writer, by_id, train, test)
    return {"source": str(root), "seed": seed}


_PRID_PERSON = re.compile(r"^person_(\d{4})$")


def _prid_person(path: Path) -> int:
    match = _PRID_PERSON.match(path.stem)
    if match is None:
        raise DatasetLayoutError(f"{path}: PRID2011 names are person_NNNN")
    return int(match.group(1))


def prepare_prid(raw: Path, writer: SiteWriter, seed: int = 0, split_file: Path | None = None,
                 **_: Any) -> dict[str, Any]:
    root = find_root(raw, ("single_shot/cam_a", "single_shot/cam_b", "multi_shot/cam_a", "multi_shot/cam_b"),
                     ("prid_2011", "prid2011", "PRID2011"))
    single = {cam: {_prid_person(p): p for p in list_images(root / "single_shot" / folder)}
              for cam, folder in (("a", "cam_a"), ("b", "cam_b"))}
    shared = sorted(set(single["a"]) & set(single["b"]) & set(range(1, 201)))
    train_shared, test = choose_split("prid", shared, seed, split_file, writer.out)
    # people who appear in one camera only are different people with the same number: own pid ranges
    a_only, b_only = sorted(p for p in single["a"] if p > 200), sorted(p for p in single["b"] if p > 200)
    rng = random.Random(seed)
    index = 0

    def frames(cam: str, person: int) -> list[Path]:
        sequence = root / "multi_shot" / f"cam_{cam}" / f"person_{person:04d}"
        chosen = list_images(sequence) if sequence.is_dir() else []
        return sorted(rng.sample(chosen, PRID_FRAMES_PER_CAMERA)) if len(chosen) > PRID_FRAMES_PER_CAMERA else chosen

    for person in sorted(train_shared):
        for cam_number, cam in ((1, "a"), (2, "b")):
            for path in frames(cam, person):
                index += 1
                writer.copy("train", path, market_name(person, cam_number, index, path.suffix))
    for person in a_only:
        for path in frames("a", person):
            index += 1
            writer.copy("train", path, market_name(1000 + person, 1, index, path.suffix))
    for person in sorted(test):
        index += 1
        writer.copy("query", single["a"][person], market_name(person, 1, index, single["a"][person].suffix))
        index += 1
        writer.copy("gallery", single["b"][person], market_name(person, 2, index, single["b"][person].suffix))
    for person in b_only:
        index += 1
        writer.copy("gallery", single["b"][person], market_name(2000 + person, 2, index, single["b"][person].suffix))
    return {"source": str(root), "seed": seed, "frames_per_camera": PRID_FRAMES_PER_CAMERA}


def prepare_3dpes(raw: Path, writer: SiteWriter, seed: int = 0, split_file: Path | None = None,
                  **_: Any) -> dict[str, Any]:
    root = find_root(raw, ("RGB",), ("3DPeS", "3dpes"))
    views: dict[int, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in list_images(root / "RGB"):
        fields = path.stem.split("_")
        if len(fields) < 2 or not fields[0].isdigit():
            raise DatasetLayoutError(f"{path}: 3DPeS names are <pid>_<view>_...")
        views[int(fields[0])][fields[1]].append(path)
    rng = random.Random(seed)
    by_id = {pid: _split_views_in_two(views[pid], rng) for pid in sorted(views)}
    train, test = choose_split("3dpes", list(by_id), seed, split_file, writer.out)
    _write_two_cameras(writer, by_id, train, test)
    return {"source": str(root), "seed": seed}


def prepare_ilids(raw: Path, writer: SiteWriter, seed: int = 0, split_file: Path | None = None,
                  **_: Any) -> dict[str, Any]:
    root = find_root(raw, ("Persons",), ("i-LIDS_Pedestrian", "ilids", "i-LIDS"))
    images: dict[int, dict[str, list[Path]]] = defaultdict(dict)
    for path in list_images(root / "Persons"):
        if len(path.stem) < 7 or not path.stem[:7].isdigit():
            raise DatasetLayoutError(f"{path}: i-LIDS names are PPPPCCC.jpg")
        images[int(path.stem[:4])][path.stem] = [path]
    rng = random.Random(seed)
    by_id = {pid: _split_views_in_two(images[pid], rng) for pid in sorted(images)}
    train, test = choose_split("ilids", list(by_id), seed, split_file, writer.out)
    _write_two_cameras(writer, by_id, train, test)
    return {"source": str(root), "seed": seed}
