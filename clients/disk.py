"""What a deployed site keeps on its disk, bounded: the server names runs and image sizes, so it
could otherwise make the site write without end (a new state and model file per run tag, a new
image cache per ``model.height``).

* decoded images: one cache folder per state of the data folder (its fingerprint); a folder left
  from other data is removed, and inside it only the most recently used files are kept;
* state and model files: those of the newest few runs (``--keep-runs``), never the current one's.

Files are created readable by the site's user only (fedreid-client runs with umask 077).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("clients")
CACHE_FILES_KEPT = 6  # train, query, gallery, FedKLPR's training part and held-back part, one spare


def fingerprint_cache(root: Path, fingerprint: str) -> Path:
    """``root/<fingerprint>``, with every other fingerprint's folder (and loose older files) removed."""
    folder = root / fingerprint[:16]
    if root.is_dir():
        for other in root.iterdir():
            if other != folder:
                log.info("removing the image cache of other data: %s", other.name)
                shutil.rmtree(other) if other.is_dir() else other.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prune_newest(files: list[Path], keep: int, current: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the ``keep`` most recently modified of ``files`` (``current`` always stays);
    returns what was deleted."""
    existing = [f for f in files if f.is_file()]
    ranked = sorted(existing, key=lambda f: f.stat().st_mtime_ns, reverse=True)
    kept = set(current) | set(ranked[:keep])
    removed = [f for f in ranked if f not in kept]
    for file in removed:
        file.unlink(missing_ok=True)
    return removed
