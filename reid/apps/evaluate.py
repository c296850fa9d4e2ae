"""``fedreid-eval``: Rank-1/5/10, mAP and mINP of a model on any folder in the Market layout.

The same evaluator as the federation's (reid/evaluate.py): a site's own model on its own folder
gives the numbers its last evaluation reported; a dataset that never took part shows how far the
model travels. Only local files are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reid.apps.common import adapt_to, configure_logging, model_arguments, open_model
from reid.data.dataset import load_reid_data
from reid.data.layout import DatasetLayoutError
from reid.evaluate import evaluate_model
from reid.inference import ReIDModel


def evaluate_folder(model: ReIDModel, folder: Path, say: bool = True) -> dict[str, Any]:
    """The evaluation of ``model`` on ``folder`` (query/ and gallery/, train/ optional) as plain values."""
    data = load_reid_data(folder, need_train=False)
    note = adapt_to(model, data, say)
    result = evaluate_model(model.net, data, model.device, model.batch_size)
    return {
        "folder": str(folder), "model": model.info.site or "global", "round": model.info.round,
        "rank1": result.rank(1), "rank5": result.rank(5), "rank10": result.rank(10),
        "mAP": result.mAP, "mAP-market": result.mAP_market, "mINP": result.mINP,
        "num-queries": result.num_valid_queries, "num-gallery": len(data.gallery),
        "skipped-queries": result.num_skipped_queries, "corrupt-images": data.num_corrupt,
        "batchnorm": note or ("the model's own" if not model.info.needs_batchnorm else "adapted before"),
    }


def format_report(report: dict[str, Any]) -> str:
    rows = [("Rank-1", report["rank1"]), ("Rank-5", report["rank5"]), ("Rank-10", report["rank10"]),
            ("mAP", report["mAP"]), ("mAP (Market's convention)", report["mAP-market"]), ("mINP", report["mINP"])]
    lines = [f"{report['folder']}: {report['num-queries']} queries against {report['num-gallery']} gallery images "
             f"(model: {report['model']}, round {report['round']})"]
    lines += [f"  {name:<26} {100 * value:6.2f}%" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedreid-eval", description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="a folder with query/ and gallery/ (Market layout)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    model = open_model(args)
    try:
        report = evaluate_folder(model, args.data)
    except DatasetLayoutError as error:
        sys.exit(f"error: {error}")
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report))


if __name__ == "__main__":
    main()
