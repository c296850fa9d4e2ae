"""Read a Market-1501-style re-ID folder into lists of (path, pid, camid).

Every dataset preparer and the synthetic generator write this one layout, so one reader serves
all of them::

    <root>/
      train/    (or bounding_box_train/)  <pid>_c<cam>s<seq>_<frame>_<n>.jpg
      query/
      gallery/  (or bounding_box_test/)

pid ``-1`` marks junk boxes and is dropped; pid ``0000`` marks distractors and is kept (they are
negatives in the gallery). Camera ids may have several digits (MSMT17 has c1..c15).

An unsupervised site (FedUReID) may hold a ``train/`` folder of unlabelled crops named in any way:
scanned with ``labelled=False``, every image is kept, and a name that happens to follow the layout
keeps its pid only for reporting cluster purity (``UNLABELLED_PID`` otherwise).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "bounding_box_train"),
    "query": ("query",),
    "gallery": ("gallery", "bounding_box_test"),
}
JUNK_PID = -1
UNLABELLED_PID = -2  # an unlabelled training image whose name carries no pid
_NAME = re.compile(r"^(-?\d+)_c(\d+)")

EXPECTED_LAYOUT = """expected a Market-1501-style layout:
  <root>/train/    (or bounding_box_train/)   <pid>_c<cam>s<seq>_<frame>_<n>.jpg
  <root>/query/
  <root>/gallery/  (or bounding_box_test/)
pid -1 = junk (dropped), pid 0000 = distractor (kept in the gallery); .jpg/.jpeg/.png/.bmp"""


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing, empty, or not in the expected layout."""


@dataclass(frozen=True)
class Sample:
    """One image of a re-ID split."""

    path: Path
    pid: int
    camid: int


@dataclass
class SplitScan:
    """What scanning one split folder found, including what it had to leave out."""

    folder: Path
    samples: list[Sample]
    junk: int = 0
    unparsed: list[Path] = field(default_factory=list)


def parse_name(name: str) -> tuple[int, int] | None:
    """Return (pid, camid) parsed from a file name, or None when it does not follow the layout."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def site_folders(sites_root: Path) -> list[Path]:
    """A folder of sites (one sub-folder each), in sorted order: the partition order of a simulation."""
    return sorted(p for p in sites_root.iterdir() if p.is_dir())


def find_split_folder(root: Path, split: str) -> Path:
    """Return the folder holding ``split`` under ``root``, accepting the Market alias names."""
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} does not exist or is not a folder; {EXPECTED_LAYOUT}")
    for name in SPLIT_FOLDERS[split]:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    tried = " or ".join(f"{root / n}/" for n in SPLIT_FOLDERS[split])
    raise DatasetLayoutError(f"missing {split} folder: {tried} not found; {EXPECTED_LAYOUT}")


def scan_split(root: Path, split: str, labelled: bool = True) -> SplitScan:
    """Scan one split: parse ids and cameras from names, drop junk, remember unparsable names.

    ``labelled=False`` keeps every image whatever its name (junk included: nothing reads its pid)."""
    folder = find_split_folder(root, split)
    scan = SplitScan(folder=folder, samples=[])
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        parsed = parse_name(path.name)
        if not labelled:
            pid, camid = parsed if parsed is not None else (UNLABELLED_PID, -1)
            scan.samples.append(Sample(path=path, pid=pid, camid=camid))
            continue
        if parsed is None:
            scan.unparsed.append(path)
            continue
        pid, camid = parsed
        if pid == JUNK_PID:
            scan.junk += 1
            continue
        scan.samples.append(Sample(path=path, pid=pid, camid=camid))
    if not scan.samples:
        raise DatasetLayoutError(f"{split} folder {folder} holds no usable images; {EXPECTED_LAYOUT}")
    if scan.unparsed:
        log.warning(
            "%s: skipped %d image(s) whose names do not follow <pid>_c<cam>..., e.g. %s",
            folder, len(scan.unparsed), scan.unparsed[0].name,
        )
    return scan
