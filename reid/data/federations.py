"""The named synthetic federations (``synthetic``, ``synthetic-resdrift``, ``synthetic-fedreid9``):
which site styles each has, what its sites' folders are called, and ``fedreid-synth``, which writes
them. The looks themselves are reid/data/synthetic.py; the nine FedReID-shaped sites are
reid/data/fedreid9.py."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from reid.data import fedreid9
from reid.data.synthetic import DEFAULT_STYLES, RESOLUTION_PROFILES, SiteStyle, SiteSummary, generate_site, style_for

log = logging.getLogger("reid.data.synthetic")

FEDERATIONS = ("synthetic", "synthetic-resdrift", "synthetic-fedreid9")


def federation_size(federation: str) -> int | None:
    """How many sites a fixed federation has (None: ``synthetic`` makes as many as asked for)."""
    return {"synthetic-resdrift": len(RESOLUTION_PROFILES), fedreid9.FEDERATION: len(fedreid9.styles())}.get(federation)


def federation_styles(federation: str, num_sites: int, seed: int = 0) -> list[SiteStyle]:
    """The site styles of a named synthetic federation: ``synthetic`` (the default camera sites),
    ``synthetic-resdrift`` (the first sites' looks, each with one resolution profile) or
    ``synthetic-fedreid9`` (nine FedReID-shaped sites and two held-out ones: reid/data/fedreid9.py)."""
    if federation == "synthetic":
        return [style_for(i, seed) for i in range(num_sites)]
    if federation == "synthetic-fedreid9":
        every = fedreid9.styles(seed)
        if num_sites > len(every):
            raise ValueError(f"synthetic-fedreid9 has {len(every)} sites, {num_sites} were asked for")
        return every[:num_sites]
    if federation == "synthetic-resdrift":
        if num_sites > len(RESOLUTION_PROFILES):
            raise ValueError(f"synthetic-resdrift has {len(RESOLUTION_PROFILES)} sites, {num_sites} were asked for")
        return [replace(DEFAULT_STYLES[i], name=profile.name, resolution=profile)
                for i, profile in enumerate(RESOLUTION_PROFILES[:num_sites])]
    raise ValueError(f"unknown synthetic federation {federation!r}; choose one of {FEDERATIONS}")



def site_names(num_sites: int, seed: int = 0, federation: str = "synthetic") -> list[str]:
    """Folder names of the sites generate_sites writes: '<index>-<style>' so they sort in order
    (synthetic-fedreid9: the dataset names its sites stand for, as the fedreid9 profile names them)."""
    styles = federation_styles(federation, num_sites, seed)
    if federation == "synthetic-fedreid9":
        return [style.name for style in styles]
    return [f"{i}-{style.name}" for i, style in enumerate(styles)]


def generate_sites(root: str | Path, num_sites: int = 3, seed: int = 0, overwrite: bool = False,
                   federation: str = "synthetic") -> list[SiteSummary]:
    """Write ``num_sites`` sites of ``federation`` under ``root``/<index>-<name>/ (refuses to touch
    non-empty folders unless ``overwrite``), one site per CPU core at a time."""
    root = Path(root)
    jobs = [(root / name, index, seed, style, overwrite) for index, (name, style)
            in enumerate(zip(site_names(num_sites, seed, federation), federation_styles(federation, num_sites, seed)))]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        summaries = [_generate(*job) for job in jobs]
    else:  # each site draws from its own seed, so the bytes do not depend on which process wrote them
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(_generate, *zip(*jobs)))
    for (folder, *_), summary in zip(jobs, summaries):
        log.info("synthetic site %s: %s", folder.name, summary.counts)
    return summaries


def _generate(folder: Path, index: int, seed: int, style: SiteStyle, overwrite: bool) -> SiteSummary:
    return generate_site(folder, index, seed, style=style, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    """``fedreid-synth --out data/synthetic --sites 3 --seed 0``: write synthetic sites
    (``--federation synthetic-fedreid9``: all eleven into data/synthetic-fedreid9)."""
    parser = argparse.ArgumentParser(description="Generate synthetic re-ID camera sites (Market-1501 layout).")
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="folder to write the sites into")
    parser.add_argument("--sites", type=int, default=None, help="number of sites (default 3, or all of a fixed "
                        "federation's)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes")
    parser.add_argument("--overwrite", action="store_true", help="replace site folders that already hold images")
    parser.add_argument("--federation", default="synthetic", choices=FEDERATIONS,
                        help="synthetic-resdrift: four sites whose cameras differ in resolution; synthetic-fedreid9: "
                             "nine FedReID-shaped sites and two held-out ones (default --out data/<federation>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out == Path("data/synthetic") and args.federation != "synthetic":
        args.out = Path("data") / args.federation
    sites = args.sites or federation_size(args.federation) or 3
    for summary in generate_sites(args.out, sites, args.seed, overwrite=args.overwrite,
                                  federation=args.federation):
        print(f"{summary.root}: {summary.counts}")
