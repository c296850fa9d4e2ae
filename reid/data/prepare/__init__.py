"""Turn the original releases of the nine FedReID benchmark datasets into the site layout.

``prepare(name, raw, out)`` writes ``out/{train,query,gallery}/`` with Market-style names,
``out/prepare.json`` (what was written) and, for the small datasets, ``out/split.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from reid.data.prepare.big import prepare_duke, prepare_market, prepare_msmt17
from reid.data.prepare.cuhk03 import prepare_cuhk03
from reid.data.prepare.site_writer import PrepareReport, SiteWriter
from reid.data.prepare.small import prepare_3dpes, prepare_cuhk01, prepare_ilids, prepare_prid, prepare_viper

Preparer = Callable[..., dict[str, Any]]

PREPARERS: dict[str, tuple[Preparer, dict[str, Any]]] = {
    "market": (prepare_market, {}),
    "duke": (prepare_duke, {}),
    "cuhk03": (prepare_cuhk03, {"variant": "detected"}),  # the FedReID benchmark's choice
    "cuhk03-labeled": (prepare_cuhk03, {"variant": "labeled"}),
    "msmt17": (prepare_msmt17, {}),
    "cuhk01": (prepare_cuhk01, {}),
    "viper": (prepare_viper, {}),
    "prid": (prepare_prid, {}),
    "3dpes": (prepare_3dpes, {}),
    "ilids": (prepare_ilids, {}),
}


def prepare(name: str, raw: Path, out: Path, force: bool = False, seed: int = 0,
            split_file: Path | None = None) -> PrepareReport:
    """Prepare dataset ``name`` from ``raw`` into ``out`` (resumable, idempotent)."""
    if name not in PREPARERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(PREPARERS)}")
    if not raw.is_dir():
        raise FileNotFoundError(f"raw folder {raw} does not exist")
    preparer, options = PREPARERS[name]
    writer = SiteWriter(out, name, force=force)
    extra = preparer(raw, writer, seed=seed, split_file=split_file, **options)
    return writer.finish(extra)
