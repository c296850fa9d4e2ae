"""`fedreid-prepare --check OUT_DIR`: count what a prepared site holds and compare with the papers.

Counts identities, images and cameras per split, decodes every image to find unreadable ones, and,
when ``prepare.json`` names a known dataset, sets the counts beside the published statistics
(FedReID benchmark table; Market/Duke/MSMT17/CUHK03 as in their papers). Counts of the small
datasets depend on the seeded split (PRID, 3DPeS and i-LIDS image counts vary by a few percent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reid.data.dataset import ReIDData, load_reid_data
from reid.data.prepare.site_writer import read_manifest

# published (train ids, train images, query ids, query images, gallery images, cameras)
PUBLISHED: dict[str, tuple[int, int, int, int, int, int]] = {
    "market": (751, 12936, 750, 3368, 15913, 6),  # gallery without the 2,793 junk (-1) images
    "duke": (702, 16522, 702, 2228, 17661, 8),
    "cuhk03": (767, 7365, 700, 1400, 5332, 2),
    "cuhk03-labeled": (767, 7368, 700, 1400, 5328, 2),
    "msmt17": (1041, 32621, 3060, 11659, 82161, 15),
    "cuhk01": (485, 1940, 486, 972, 972, 2),
    "viper": (316, 632, 316, 316, 316, 2),
    "prid": (285, 3744, 100, 100, 649, 2),
    "3dpes": (93, 450, 86, 246, 316, 2),
    "ilids": (59, 248, 60, 98, 130, 2),
}
FIELDS = ("train ids", "train images", "query ids", "query images", "gallery images", "cameras")


@dataclass
class CheckResult:
    """Counts of one prepared site and how they compare with the published ones."""

    root: Path
    dataset: str | None
    counts: dict[str, int]
    complete: bool = True
    corrupt: list[Path] = field(default_factory=list)
    differences: dict[str, tuple[int, int]] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"{self.root} ({self.dataset or 'unknown dataset'}):"]
        if not self.complete:
            lines.append("  WARNING: the preparation did not finish (prepare.json is missing or incomplete); "
                         "run fedreid-prepare again to complete it")
        published = PUBLISHED.get(self.dataset or "")
        for position, name in enumerate(FIELDS):
            expected = f"  (published {published[position]:,})" if published else ""
            lines.append(f"  {name:<15} {self.counts[name]:>8,}{expected}")
        lines.append(f"  unreadable images: {len(self.corrupt)}" + "".join(f"\n    {p}" for p in self.corrupt[:20]))
        if published:
            lines.append("  matches the published statistics" if not self.differences else
                         f"  differs from the published statistics in: {', '.join(self.differences)}")
        return "\n".join(lines)


def count_site(data: ReIDData) -> dict[str, int]:
    cameras = {s.camid for split in (data.train, data.query, data.gallery) for s in split}
    return {"train ids": len({s.pid for s in data.train}), "train images": len(data.train),
            "query ids": len({s.pid for s in data.query}), "query images": len(data.query),
            "gallery images": len(data.gallery), "cameras": len(cameras)}


def check_site(root: Path) -> CheckResult:
    """Raise DatasetLayoutError (naming path and layout) when the layout is wrong."""
    data = load_reid_data(root, verify=True)
    manifest = read_manifest(root) or {}
    dataset = manifest.get("dataset")
    result = CheckResult(root, dataset, count_site(data), complete=bool(manifest.get("complete")),
                         corrupt=[p for report in data.reports.values() for p in report.corrupt])
    if dataset in PUBLISHED:
        for position, name in enumerate(FIELDS):
            if result.counts[name] != PUBLISHED[dataset][position]:
                result.differences[name] = (result.counts[name], PUBLISHED[dataset][position])
    return result
