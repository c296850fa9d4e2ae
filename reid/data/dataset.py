"""A site's re-ID data: the three splits, checked image by image, and a torch Dataset over them.

Unreadable or corrupt images are found once, when the site is loaded, so that training and
feature extraction never meet them: they are skipped, counted and reported, never a crash.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from reid.data.layout import UNLABELLED_PID, DatasetLayoutError, Sample, SplitScan, find_split_folder, scan_split

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")


def is_readable_image(path: Path) -> bool:
    """Decode the whole file (JPEGs at 1/8 scale, which still reads every byte) to catch corruption."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return True
    except Exception:  # PIL raises many types for broken files; all mean "unreadable"
        return False


def drop_unreadable(samples: list[Sample], workers: int = 4) -> tuple[list[Sample], list[Path]]:
    """Split samples into readable ones and the paths of the unreadable ones."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        readable = list(pool.map(lambda s: is_readable_image(s.path), samples))
    good = [s for s, ok in zip(samples, readable) if ok]
    bad = [s.path for s, ok in zip(samples, readable) if not ok]
    return good, bad


@dataclass
class SplitReport:
    """What was left out of one split and why."""

    kept: int
    junk: int
    unparsed: int
    corrupt: list[Path] = field(default_factory=list)


@dataclass
class ReIDData:
    """The train/query/gallery samples of one site, ready to wrap in datasets."""

    name: str
    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    reports: dict[str, SplitReport]
    labelled_train: bool = True  # False: train/ was scanned as unlabelled crops (FedUReID)

    @property
    def train_pids(self) -> list[int]:
        """Sorted identity ids of the training split; index = classifier label."""
        return sorted({s.pid for s in self.train})

    @property
    def num_train_ids(self) -> int:
        return len(self.train_pids)

    @property
    def num_corrupt(self) -> int:
        return sum(len(r.corrupt) for r in self.reports.values())

    def summary(self) -> str:
        """One line for logs: sizes, plus every kind of skipped file with its count."""
        named = all(s.pid != UNLABELLED_PID for s in self.train)  # an unlabelled scan of a labelled folder
        ids = f"{self.num_train_ids} ids" if named else "unlabelled"
        parts = [
            f"{self.name}: train {len(self.train)} images / {ids},",
            f"query {len(self.query)}, gallery {len(self.gallery)}",
        ]
        for split, report in self.reports.items():
            skipped = []
            if report.corrupt:
                skipped.append(f"{len(report.corrupt)} corrupt")
            if report.unparsed:
                skipped.append(f"{report.unparsed} badly named")
            if report.junk:
                skipped.append(f"{report.junk} junk (pid -1)")
            if skipped:
                parts.append(f"[{split}: skipped {', '.join(skipped)}]")
        return " ".join(parts)


def _load_split(root: Path, split: str, verify: bool, labelled: bool = True) -> tuple[list[Sample], SplitReport]:
    scan: SplitScan = scan_split(root, split, labelled)
    if verify and len(scan.samples) > 2000:
        log.info("checking %d images in %s for corruption ...", len(scan.samples), scan.folder)
    samples, corrupt = drop_unreadable(scan.samples) if verify else (scan.samples, [])
    for path in corrupt:
        log.warning("skipping unreadable image %s", path)
    report = SplitReport(kept=len(samples), junk=scan.junk, unparsed=len(scan.unparsed), corrupt=corrupt)
    return samples, report


def _has_split(root: Path, split: str) -> bool:
    try:
        find_split_folder(root, split)
    except DatasetLayoutError:
        return False
    return True


def load_reid_data(root: str | Path, name: str | None = None, verify: bool = True,
                   labelled_train: bool = True, need_train: bool = True) -> ReIDData:
    """Scan and check a site's three splits; raise DatasetLayoutError naming what is missing.

    ``labelled_train=False`` accepts training images named in any form (query and gallery keep
    their labels: evaluation needs them); ``need_train=False`` accepts a folder with only query
    and gallery (a test set), leaving ``train`` empty."""
    root = Path(root)
    splits = SPLITS if need_train or _has_split(root, "train") else tuple(s for s in SPLITS if s != "train")
    loaded = {split: _load_split(root, split, verify, labelled_train or split != "train") for split in splits}
    loaded.setdefault("train", ([], SplitReport(kept=0, junk=0, unparsed=0, corrupt=[])))
    data = ReIDData(
        name=name or root.name,
        root=root,
        train=loaded["train"][0],
        query=loaded["query"][0],
        gallery=loaded["gallery"][0],
        reports={split: loaded[split][1] for split in SPLITS},
        labelled_train=labelled_train,
    )
    log.info("%s", data.summary())
    return data


class ImageDataset(Dataset):
    """Images with a target per sample: a classifier label for training, the pid for evaluation."""

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        targets: list[int] | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.targets = targets if targets is not None else [s.pid for s in samples]

    @classmethod
    def for_training(cls, data: ReIDData, transform: Callable[[Image.Image], torch.Tensor]) -> "ImageDataset":
        """Relabel the training pids to 0..C-1 in sorted order, the order the site's classifier uses."""
        label_of = {pid: label for label, pid in enumerate(data.train_pids)}
        return cls(data.train, transform, [label_of[s.pid] for s in data.train])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        with Image.open(sample.path) as image:
            tensor = self.transform(image.convert("RGB"))
        return tensor, self.targets[index], sample.camid
