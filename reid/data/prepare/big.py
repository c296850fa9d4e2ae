"""The four large benchmark datasets, from their original releases, with their fixed splits.

- Market-1501: ``bounding_box_train/``, ``bounding_box_test/``, ``query/`` (optionally under
  ``Market-1501-v15.09.15/``); names are kept (they already follow the layout); pid -1 (junk) is
  dropped, pid 0000 (distractors) is kept in the gallery.
- DukeMTMC-reID: the same three folders (optionally under ``DukeMTMC-reID/``); names such as
  ``0005_c2_f0046985.jpg`` already parse and are kept.
- MSMT17 (V1, or V2's ``mask_*_v2`` folders): images under ``train/`` and ``test/`` plus
  ``list_{train,val,query,gallery}.txt`` (``<relative path> <pid>``). Train = list_train + list_val
  (the 32,621 images the FedReID benchmark counts); the camera is the third ``_`` field of the file
  name (1..15); ids are shifted by +1 (0 is a real person there) and test ids by +10000 more, so
  train and test identities never collide.
- CUHK03 is in ``cuhk03.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from reid.data.layout import IMAGE_SUFFIXES, DatasetLayoutError
from reid.data.prepare.site_writer import SiteWriter, market_name

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
MSMT_TEST_OFFSET = 10000


def find_root(raw: Path, required: tuple[str, ...], nested: tuple[str, ...]) -> Path:
    """``raw`` itself or one of its ``nested`` sub-folders, whichever holds every ``required`` entry."""
    for candidate in (raw, *(raw / n for n in nested)):
        if all((candidate / r).exists() for r in required):
            return candidate
    looked = ", ".join(str(c) for c in (raw, *(raw / n for n in nested)))
    raise DatasetLayoutError(f"{raw}: expected {', '.join(required)} inside one of: {looked}")


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (hidden ones, e.g. macOS ``._*`` files, left out), sorted:
    the order fixes the written names."""
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _market_style(raw: Path, writer: SiteWriter, nested: tuple[str, ...]) -> dict[str, Any]:
    root = find_root(raw, ("bounding_box_train", "bounding_box_test", "query"), nested)
    unparsed = junk = 0
    for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        for path in list_images(root / folder):
            match = _MARKET_NAME.match(path.name)
            if match is None:
                unparsed += 1
                continue
            if int(match.group(1)) == -1:
                junk += 1
                continue
            writer.copy(split, path, path.name)
    return {"source": str(root), "junk_dropped": junk, "unparsed_names": unparsed}


def prepare_market(raw: Path, writer: SiteWriter, **_: Any) -> dict[str, Any]:
    return _market_style(raw, writer, ("Market-1501-v15.09.15", "Market-1501", "Market"))


def prepare_duke(raw: Path, writer: SiteWriter, **_: Any) -> dict[str, Any]:
    return _market_style(raw, writer, ("DukeMTMC-reID",))


def _read_list(path: Path) -> list[tuple[str, int]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetLayoutError(f"{path}:{number}: expected '<relative path> <pid>', got {line!r}")
        entries.append((parts[0], int(parts[1])))
    return entries


def prepare_msmt17(raw: Path, writer: SiteWriter, **_: Any) -> dict[str, Any]:
    lists = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
    root = find_root(raw, lists, ("MSMT17_V1", "MSMT17_V2", "MSMT17"))
    train_dir = root / "train" if (root / "train").is_dir() else root / "mask_train_v2"
    test_dir = root / "test" if (root / "test").is_dir() else root / "mask_test_v2"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise DatasetLayoutError(f"{root}: missing image folder {folder.name}/ (train/ + test/ for V1, "
                                     f"mask_train_v2/ + mask_test_v2/ for V2)")
    index = 0
    for list_name, split, folder, offset in (("list_train.txt", "train", train_dir, 1),
                                             ("list_val.txt", "train", train_dir, 1),
                                             ("list_query.txt", "query", test_dir, 1 + MSMT_TEST_OFFSET),
                                             ("list_gallery.txt", "gallery", test_dir, 1 + MSMT_TEST_OFFSET)):
        for relative, pid in _read_list(root / list_name):
            source = folder / relative
            if not source.is_file():
                raise DatasetLayoutError(f"{root / list_name} names {relative}, which is not in {folder}")
            camera = int(Path(relative).name.split("_")[2])
            index += 1
            writer.copy(split, source, market_name(pid + offset, camera, index, source.suffix))
    return {"source": str(root)}
