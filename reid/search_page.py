"""Ranked lists for a person: one self-contained HTML page (images embedded, no script) and a PNG grid.

Each query is shown with its top-k gallery crops and their distances. Where file names carry
identities (``<pid>_c<cam>...``), a frame says what each crop is: green for the same person seen by
another camera (a true match), red for someone else, grey and dashed for the same person in the
query's own camera, which the standard protocol ignores. Names without identities get no colour.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from reid.data.layout import parse_name

MATCH, WRONG, SAME_CAMERA, UNKNOWN = "match", "wrong", "same-camera", "unknown"
COLOURS = {MATCH: (26, 152, 80), WRONG: (215, 48, 39), SAME_CAMERA: (150, 150, 150), UNKNOWN: (90, 90, 90)}
LABELS = {MATCH: "same person, other camera", WRONG: "another person",
          SAME_CAMERA: "same person, same camera (ignored by the protocol)", UNKNOWN: "identity unknown"}
THUMB_HEIGHT = 128  # crops on the HTML page
GRID_HEIGHT = 96  # crops in the PNG grid (100 queries x 11 crops stay under 10 MB)


@dataclass(frozen=True)
class Hit:
    path: Path
    distance: float
    kind: str  # MATCH, WRONG, SAME_CAMERA or UNKNOWN


@dataclass(frozen=True)
class QueryResult:
    path: Path
    hits: list[Hit]


def judge(query: Path, candidate: Path) -> str:
    """What ``candidate`` is for ``query``, from the two file names."""
    q, g = parse_name(query.name), parse_name(candidate.name)
    if q is None or g is None or q[0] < 0:
        return UNKNOWN
    if q[0] != g[0]:
        return WRONG
    return SAME_CAMERA if q[1] == g[1] else MATCH


def thumbnail(path: Path, height: int = THUMB_HEIGHT) -> Image.Image:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width = max(1, round(rgb.width * height / rgb.height))
    return rgb.resize((width, height), Image.Resampling.BICUBIC)


def _data_uri(path: Path) -> str:
    buffer = io.BytesIO()
    thumbnail(path).save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} p.meta{margin:2px 0;color:#555;font-size:13px}
ul.legend{list-style:none;padding:0;display:flex;gap:18px;font-size:13px}
ul.legend li span{display:inline-block;width:14px;height:14px;margin-right:6px;vertical-align:-2px}
section.query{display:flex;gap:8px;align-items:flex-start;margin:14px 0;padding:10px;background:#fff;
 border:1px solid #ddd;border-radius:6px;overflow-x:auto}
figure{margin:0;text-align:center;font-size:11px;flex:0 0 auto}
figure img{display:block;height:128px;border:4px solid #fff;border-radius:3px}
figure.probe img{border-color:#1f4e9c} figure.probe{margin-right:12px}
figure.match img{border-color:rgb(26,152,80)} figure.wrong img{border-color:rgb(215,48,39)}
figure.same-camera img{border:4px dashed rgb(150,150,150);opacity:.75} figure.unknown img{border-color:#bbb}
figcaption{margin-top:3px;max-width:96px;overflow-wrap:anywhere}
"""


def render_html(results: Sequence[QueryResult], title: str, facts: Sequence[str]) -> str:
    """The page: a header with ``facts``, a legend, then one row per query."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='meta'>{html.escape(fact)}</p>" for fact in facts]
    parts.append("<ul class='legend'>" + "".join(
        f"<li><span style='background:rgb{COLOURS[kind]}'></span>{html.escape(LABELS[kind])}</li>"
        for kind in (MATCH, WRONG, SAME_CAMERA)) + "</ul>")
    for result in results:
        name = html.escape(result.path.name)
        parts.append(f"<section class='query' data-query='{name}'>"
                     f"<figure class='probe'><img src='{_data_uri(result.path)}' alt='query {name}'>"
                     f"<figcaption>query<br>{name}</figcaption></figure>")
        for rank, hit in enumerate(result.hits, start=1):
            hit_name = html.escape(hit.path.name)
            parts.append(f"<figure class='{hit.kind}' data-rank='{rank}' data-file='{hit_name}' "
                         f"data-distance='{hit.distance:.4f}' title='{html.escape(LABELS[hit.kind])}'>"
                         f"<img src='{_data_uri(hit.path)}' alt='rank {rank}: {hit_name}'>"
                         f"<figcaption>#{rank} d={hit.distance:.3f}<br>{hit_name}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def render_grid(results: Sequence[QueryResult], cell_height: int = GRID_HEIGHT) -> Image.Image:
    """One row per query: the query (blue frame), a gap, then its top-k with coloured frames and
    their distances underneath; same-camera crops are drawn faded."""
    border, caption, gap = 4, 16, 12
    cell_width = cell_height // 2 + 2 * border
    columns = 1 + max((len(r.hits) for r in results), default=0)
    width = columns * (cell_width + 4) + gap + 8
    row_height = cell_height + 2 * border + caption + 6
    grid = Image.new("RGB", (width, max(1, len(results)) * row_height + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, result in enumerate(results):
        top = row * row_height + 4
        cells = [(result.path, (31, 78, 156), "query", False)] + [
            (hit.path, COLOURS[hit.kind], f"{hit.distance:.3f}", hit.kind == SAME_CAMERA) for hit in result.hits]
        for column, (path, colour, text, faded) in enumerate(cells):
            left = 4 + column * (cell_width + 4) + (gap if column else 0)
            image = thumbnail(path, cell_height).resize((cell_width - 2 * border, cell_height))
            if faded:
                image = Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), 0.4)
            draw.rectangle([left, top, left + cell_width - 1, top + cell_height + 2 * border - 1], fill=colour)
            grid.paste(image, (left + border, top + border))
            draw.text((left + 2, top + cell_height + 2 * border + 2), text, fill=(40, 40, 40))
    return grid
