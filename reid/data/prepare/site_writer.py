"""Write one prepared site (train/query/gallery, Market-style names) safely and resumably.

- An output folder that holds anything but an earlier preparation of the same dataset is refused
  unless ``force`` (then only the split folders, the manifest and the split file are replaced).
- Every file is written to a temporary name and renamed, so an interrupted run leaves whole files;
  a rerun keeps files that are already there with the right size and writes only what is missing.
- Unreadable source images (truncated JPEGs, ...) are skipped and counted, never copied.
- ``prepare.json`` names the dataset from the start (``complete: false``), so a run cut short is
  recognised and resumed; ``finish`` removes files an earlier, different preparation left in the
  split folders and sets ``complete: true`` with the counts and the skipped files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reid.data.dataset import is_readable_image

MANIFEST = "prepare.json"
SPLITS = ("train", "query", "gallery")


class OutputNotEmptyError(FileExistsError):
    """The output folder holds something other than this dataset's preparation."""


def market_name(pid: int, cam: int, index: int, suffix: str) -> str:
    """``<pid>_c<cam>s1_<index>_00<suffix>``: what the layout reader parses (pid 4+ digits)."""
    return f"{pid:04d}_c{cam}s1_{index:06d}_00{suffix.lower()}"


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((out / MANIFEST).read_text()))
    except (OSError, ValueError):
        return None


@dataclass
class PrepareReport:
    """What one preparation wrote."""

    dataset: str
    out: Path
    counts: dict[str, int]
    written: int
    reused: int
    corrupt: list[str] = field(default_factory=list)

    def summary(self) -> str:
        sizes = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        return (f"{self.dataset} -> {self.out}: {sizes} images ({self.written} written, {self.reused} already there, "
                f"{len(self.corrupt)} unreadable source image(s) skipped)")


class SiteWriter:
    """Collects (split, name) -> source, writes idempotently, and records the result."""

    def __init__(self, out: Path, dataset: str, force: bool = False) -> None:
        self.out, self.dataset = out, dataset
        self.planned: dict[str, set[str]] = {split: set() for split in SPLITS}
        self.corrupt: list[str] = []
        self.written = self.reused = 0
        existing = read_manifest(out)
        if out.exists() and any(out.iterdir()):
            if force:
                for name in (*SPLITS, MANIFEST):
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            elif existing is None or existing.get("dataset") != dataset:
                what = f"a preparation of {existing.get('dataset')!r}" if existing else "other files"
                raise OutputNotEmptyError(f"{out} already holds {what}; choose an empty folder or pass --force "
                                          f"to replace its train/, query/ and gallery/")
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
        # until finish() the folder is marked as this dataset's preparation, not yet complete:
        # a run cut short is recognised (and resumed) by the next one
        self._write_manifest({"dataset": dataset, "complete": False})

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        temporary = self.out / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temporary, self.out / MANIFEST)

    def _target(self, split: str, name: str) -> Path:
        if split not in self.planned:
            raise ValueError(f"unknown split {split!r}")
        self.planned[split].add(name)
        return self.out / split / name

    def copy(self, split: str, source: Path, name: str) -> None:
        """Copy one source image under ``name`` (skipped and counted when unreadable)."""
        target = self._target(split, name)
        if target.exists() and target.stat().st_size == source.stat().st_size:
            self.reused += 1
            return
        if not is_readable_image(source):
            self.planned[split].discard(name)
            self.corrupt.append(str(source))
            return
        temporary = target.with_name(f".{name}.tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
        self.written += 1

    def save_array(self, split: str, image: np.ndarray, name: str) -> None:
        """Write an HxWx3 uint8 image (from a .mat release) as PNG under ``name``."""
        target = self._target(split, name)
        if target.exists() and target.stat().st_size > 0:
            self.reused += 1
            return
        temporary = target.with_name(f".{name}.tmp")
        Image.fromarray(image).save(temporary, format="PNG")
        os.replace(temporary, target)
        self.written += 1

    def finish(self, extra: dict[str, Any] | None = None) -> PrepareReport:
        """Remove stale files, write the manifest last, and report."""
        for split, names in self.planned.items():
            for path in (self.out / split).iterdir():
                if path.name not in names:
                    path.unlink()
        counts = {split: len(names) for split, names in self.planned.items()}
        self._write_manifest({"dataset": self.dataset, "complete": True, "counts": counts,
                              "skipped_unreadable": self.corrupt, **(extra or {})})
        return PrepareReport(self.dataset, self.out, counts, self.written, self.reused, self.corrupt)
