"""The comparison figures' rules: the Pareto front, one style per method, a figure that is drawn."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import compare_algorithms as bench  # noqa: E402


def test_the_pareto_front_keeps_only_points_nothing_beats_on_bytes_and_map() -> None:
    points = [(62.0, 44.0), (62.0, 42.0), (37.0, 36.0), (25.0, 38.0), (33.0, 35.0), (62.0, 44.0)]
    assert bench.pareto_front(points) == [3, 0]  # the cheapest, then the best; a tie adds nothing
    assert bench.pareto_front([(10.0, 1.0), (20.0, 2.0), (30.0, 3.0)]) == [0, 1, 2]


def test_every_method_has_its_own_colour_and_marker() -> None:
    styles = [bench._style(method) for method in bench.METHODS]
    assert len({(tuple(s["color"]), s["marker"]) for s in styles}) == len(bench.METHODS)
    for members in bench.FAMILIES.values():  # within a panel, colours alone already tell methods apart
        assert len({tuple(bench._style(m)["color"]) for m in members}) == len(members)


def test_the_bytes_against_map_figure_draws_each_method(tmp_path: Path) -> None:
    def summary(method: str, mb: float, mAP: float) -> dict:
        return {"method": method, "upload_mb": mb, "download_mb": mb, "mean": {"mAP": mAP},
                "mAP_spread": (mAP - 0.02, mAP + 0.01)}

    results = [summary("fedpav", 62.1, 0.42), summary("fedklpr", 37.0, 0.37), summary("fedklpr_fp16", 24.8, 0.38),
               summary("central", 0.0, 0.56)]
    path = tmp_path / "bytes_vs_map.png"
    bench.plot_bytes_against_map(results, path)
    image = Image.open(path).convert("RGB")
    colours = {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}
    for method in ("fedpav", "fedklpr", "fedklpr_fp16", "central"):
        rgb = tuple(round(255 * c) for c in bench._style(method)["color"][:3])
        assert rgb in colours, method
