"""Which data a site trains on: named by ``node_config`` in deployment, by partition id in simulation.

Deployment: ``flower-supernode --node-config 'dataset="market" data-root="/data/market"'``.
Simulation: every virtual SuperNode gets a ``partition-id``; the run config's ``sites-root``
holds one folder per site and partition i takes the i-th folder in sorted order, or the i-th of
the run config's ``site-names`` when a benchmark preset names its sites.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from reid.data.dataset import ReIDData, load_reid_data

_LOADED: dict[tuple[str, bool, bool], tuple[str, ReIDData]] = {}  # (folder, verify, labelled) -> (fingerprint, scan)
log = logging.getLogger("clients.site")


class SiteConfigError(ValueError):
    """The node or run configuration does not say where this site's data is."""


@dataclass(frozen=True)
class SiteLocation:
    """A site's name and the root of its Market-style folders."""

    name: str
    root: Path


def locate_site(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> SiteLocation:
    """Resolve the site from node_config (deployment) or from partition-id + sites-root (simulation)."""
    if "data-root" in node_config:
        root = Path(str(node_config["data-root"])).expanduser().resolve()
        return SiteLocation(name=str(node_config.get("dataset", root.name)), root=root)
    if "partition-id" not in node_config:
        raise SiteConfigError("node_config names no data: start the SuperNode with "
                              "--node-config 'dataset=\"NAME\" data-root=\"/path/to/site\"'")
    sites_root = Path(str(run_config.get("sites-root", ""))).expanduser().resolve()
    if not str(run_config.get("sites-root", "")) or not sites_root.is_dir():
        raise SiteConfigError(f"simulation needs run config 'sites-root' to be a folder with one sub-folder "
                              f"per site; got {str(run_config.get('sites-root', ''))!r} (resolved {sites_root})")
    names = str(run_config.get("site-names", "") or "").split()
    if names:  # a benchmark preset names its sites: exactly those folders, in that order
        missing = [n for n in names if not (sites_root / n).is_dir()]
        if missing:
            raise SiteConfigError(f"{sites_root} lacks the site folder(s) {missing}; prepare them with "
                                  f"`fedreid-prepare <dataset> <raw dir> {sites_root}/<name>`")
        sites = [sites_root / n for n in names]
    else:
        sites = sorted(p for p in sites_root.iterdir() if p.is_dir())
    partition = int(node_config["partition-id"])  # type: ignore[arg-type]
    wanted = int(node_config.get("num-partitions", len(sites)))  # type: ignore[arg-type]
    if wanted > len(sites):
        raise SiteConfigError(f"{wanted} simulated sites requested but {sites_root} holds only {len(sites)} "
                              f"site folders: {[p.name for p in sites]}")
    return SiteLocation(name=sites[partition].name, root=sites[partition])


def folder_fingerprint(root: Path) -> str:
    """Changes when a file under ``root`` is added, removed or rewritten (size or mtime): a listing
    and a stat per file, far cheaper than scanning and checking the images again."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{folder}/{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_site(location: SiteLocation, verify_images: bool = True, labelled_train: bool = True) -> ReIDData:
    """Scan (and check) the site's images once per process; later messages reuse the scan while
    the folder's fingerprint is unchanged, and scan again when it changed. ``labelled_train=False``:
    the training images may be unlabelled crops named in any form (FedUReID)."""
    key = (str(location.root), verify_images, labelled_train)
    fingerprint = folder_fingerprint(location.root)
    cached = _LOADED.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    if cached is not None:
        log.info("%s: the data folder %s changed since the last message; scanning it again", location.name,
                 location.root)
    start = time.perf_counter()
    data = load_reid_data(location.root, name=location.name, verify=verify_images, labelled_train=labelled_train)
    log.info("%s: scanned and checked %d images in %.1f s", location.name,
             len(data.train) + len(data.query) + len(data.gallery), time.perf_counter() - start)
    _LOADED[key] = (fingerprint, data)
    return data
