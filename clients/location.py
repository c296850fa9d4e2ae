"""Which data a site trains on: named by ``node_config`` in deployment, by partition id in simulation.

Deployment: ``flower-supernode --node-config 'dataset="market" data-root="/data/market"'``.
Simulation: every virtual SuperNode gets a ``partition-id``; the run config's ``sites-root``
holds one folder per site and partition i takes the i-th folder in sorted order, or the i-th of
the run config's ``site-names`` when a benchmark preset names its sites.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


IMAGES_PER_IDENTITY = "images-per-identity"  # node_config: a FedUReID site's own estimate (personalised merging)


class SiteConfigError(ValueError):
    """The node or run configuration does not say where this site's data is."""


@dataclass(frozen=True)
class SiteLocation:
    """A site's name and the root of its Market-style folders; ``deployed``: named by its own
    operator's node_config (a real site), not by a simulation's partition id."""

    name: str
    root: Path
    deployed: bool = False


def locate_site(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> SiteLocation:
    """Resolve the site from node_config (deployment) or from partition-id + sites-root (simulation)."""
    if "data-root" in node_config:
        root = Path(str(node_config["data-root"])).expanduser().resolve()
        return SiteLocation(name=str(node_config.get("dataset", root.name)), root=root, deployed=True)
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
