"""The server's public, unlabeled person images (CUHK02 in the FedReID reference).

Server-side knowledge distillation and client clustering run on these; no site owns them. Any
folder of person crops works: every image below the root is used, labels and layout are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from reid.data.dataset import drop_unreadable
from reid.data.layout import IMAGE_SUFFIXES, DatasetLayoutError, Sample
from reid.data.synthetic import DEFAULT_STYLES, SiteSummary, generate_site

log = logging.getLogger(__name__)

PUBLIC_SITE_INDEX = 99  # identities and cameras no generated client site (index < 99) can share
PUBLIC_STYLE = replace(DEFAULT_STYLES[3], name="public", num_train_ids=60, num_test_ids=0, num_cameras=5,
                       fashion_share=0.0, num_distractors=0, num_junk=0)


def load_public_images(root: str | Path, verify: bool = True) -> list[Sample]:
    """Every readable image below ``root``, in sorted order (pid/camid are 0: the set is unlabeled)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"public image folder {root} does not exist; server-side distillation and "
                                 f"clustering need a folder of unlabeled person images (any layout)")
    samples = [Sample(path=p, pid=0, camid=0) for p in sorted(root.rglob("*"))
               if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if verify:
        samples, corrupt = drop_unreadable(samples)
        if corrupt:
            log.warning("public images: skipped %d unreadable file(s), e.g. %s", len(corrupt), corrupt[0])
    if not samples:
        raise DatasetLayoutError(f"public image folder {root} holds no readable images (.jpg/.jpeg/.png/.bmp)")
    return samples


def generate_public_set(root: str | Path, seed: int = 0, overwrite: bool = False) -> SiteSummary:
    """A synthetic public set: people and cameras of their own, with every clothing hue equally likely."""
    return generate_site(Path(root), PUBLIC_SITE_INDEX, seed, style=PUBLIC_STYLE, overwrite=overwrite)
