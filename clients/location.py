"""Which data a site trains on: named by ``node_config`` in deployment, by partition id in simulation.

Deployment: ``flower-supernode --node-config 'dataset="market" data-root="/data/market"'``.
Simulation: every virtual SuperNode gets a ``partition-id``; the run config's ``sites-root``
holds one folder per site and partition i takes the i-th of the run config's ``site-names``
(fedreid-sim always sends them, so that every node of a Ray cluster maps a partition to the same
site even when one node's copy of the folder lacks a site), else the i-th folder in sorted order.
A node that lacks a folder says so with its own name: on a cluster, every node must see the sites
at the same path.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from reid.data.layout import site_folders


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


def node_name() -> str:
    """This machine's host name, and its Ray node when it runs in a Ray worker (simulation on a cluster)."""
    name = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            name += f" (Ray node {context.get_node_id()[:12]}, {ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - no Ray here, or not in a worker: the host name is enough
        pass
    return name


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
                              f"per site; got {str(run_config.get('sites-root', ''))!r} (resolved {sites_root}) "
                              f"on {node_name()}")
    names = str(run_config.get("site-names", "") or "").split()
    if names:  # a benchmark preset names its sites: exactly those folders, in that order
        missing = [n for n in names if not (sites_root / n).is_dir()]
        if missing:
            raise SiteConfigError(f"{sites_root} on {node_name()} lacks the site folder(s) {missing}; every "
                                  f"node must see the sites at the same path (prepare them with "
                                  f"`fedreid-prepare <dataset> <raw dir> {sites_root}/<name>`)")
        sites = [sites_root / n for n in names]
    else:
        sites = site_folders(sites_root)
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
