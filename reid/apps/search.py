"""``fedreid-search``: who in this gallery is the person in this crop? Ranked lists for a person.

Runs on the site's box and reads only local files: the model file, the query crop(s) and the
gallery folder. Writes one self-contained HTML page (images embedded, no script) and a PNG grid
beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reid.apps.common import configure_logging, model_arguments, open_model
from reid.inference import ReIDModel, image_files
from reid.search_page import MATCH, SAME_CAMERA, UNKNOWN, Hit, QueryResult, judge, render_grid, render_html


def search(model: ReIDModel, queries: list[Path], gallery: list[Path], top_k: int) -> list[QueryResult]:
    """The ``top_k`` gallery files nearest each query, judged by their names where they carry identities."""
    ranking = model.rank(model.embed(queries), model.embed(gallery), top_k)
    return [QueryResult(query, [Hit(gallery[j], float(d), judge(query, gallery[j]))
                                for j, d in zip(ranking.indices[i], ranking.distances[i])])
            for i, query in enumerate(queries)]


def summary(results: list[QueryResult]) -> str:
    """Rank-1 over the shown queries whose identity is known (same-camera hits skipped, as the protocol does)."""
    firsts = [next((h.kind for h in r.hits if h.kind != SAME_CAMERA), None) for r in results]
    known = [kind for kind in firsts if kind not in (None, UNKNOWN)]
    if not known:
        return "file names carry no identities: no colours"
    return f"first valid hit is the right person for {sum(k == MATCH for k in known)} of {len(known)} queries"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedreid-search", description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--query", required=True, type=Path, help="a query crop, or a folder of them")
    parser.add_argument("--gallery", required=True, type=Path, help="a folder of gallery crops")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("search.html"), help="the HTML page; the PNG grid goes "
                        "beside it (same name, .png)")
    parser.add_argument("--max-queries", type=int, default=100, help="queries drawn on the page (all are ranked)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        queries, gallery = image_files(args.query), image_files(args.gallery)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    model = open_model(args)
    facts = [f"model {args.model} ({model.info.site or 'global model'}, {model.info.algorithm or 'fedreid'}, "
             f"round {model.info.round}, {model.info.spec.backbone} at {model.info.spec.height}x{model.info.spec.width})",
             f"{len(queries)} queries against {len(gallery)} gallery crops in {args.gallery}"]
    if model.needs_batchnorm:
        count = model.adapt_batchnorm(gallery)
        facts.append(f"BatchNorm statistics recomputed on the {count} gallery crops (the model's stayed on the "
                     f"sites, bn_stats=local)")
        print(f"note: {facts[-1]}", file=sys.stderr)
    results = search(model, queries, gallery, args.top_k)
    shown = results[:args.max_queries]
    facts.append(summary(shown) + (f"; {len(shown)} of {len(results)} queries shown" if len(shown) < len(results)
                                   else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_html(shown, "fedreid-search: ranked gallery per query", facts))
    grid = args.out.with_suffix(".png")
    render_grid(shown).save(grid)
    print(f"{facts[-1]}\nwrote {args.out} and {grid}")


if __name__ == "__main__":
    main()
