"""``fedreid-prepare``: original dataset release -> site layout, and a check of the result.

    fedreid-prepare market /downloads/Market-1501-v15.09.15 data/fedreid/market
    fedreid-prepare prid /downloads/prid_2011 data/fedreid/prid --seed 0      # writes split.json
    fedreid-prepare viper /downloads/VIPeR data/fedreid/viper --split shared/viper-split.json
    fedreid-prepare --check data/fedreid/market

Datasets: market, duke, cuhk03 (new protocol, detected), cuhk03-labeled, msmt17, cuhk01, viper,
prid, 3dpes, ilids. Rerunning is safe (finished files are kept, missing ones written, stale ones
removed); an output folder holding anything else is refused unless --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from reid.data.layout import DatasetLayoutError
from reid.data.prepare import PREPARERS, prepare
from reid.data.prepare.check import check_site
from reid.data.prepare.site_writer import OutputNotEmptyError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=sorted(PREPARERS), help="which release RAW_DIR holds")
    parser.add_argument("raw", nargs="?", type=Path, help="the original release, unpacked")
    parser.add_argument("out", nargs="?", type=Path, help="the site folder to write")
    parser.add_argument("--check", type=Path, metavar="OUT_DIR", help="count and verify a prepared site")
    parser.add_argument("--force", action="store_true", help="replace what OUT_DIR holds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the small datasets' identity split")
    parser.add_argument("--split", type=Path, default=None, help="reuse a split.json instead of drawing one")
    args = parser.parse_args(argv)
    try:
        if args.check is not None:
            result = check_site(args.check)
            print(result.report())
            return 0 if not result.corrupt and result.complete else 1
        if args.dataset is None or args.raw is None or args.out is None:
            parser.error("give DATASET RAW_DIR OUT_DIR, or --check OUT_DIR")
        report = prepare(args.dataset, args.raw, args.out, force=args.force, seed=args.seed, split_file=args.split)
    except (DatasetLayoutError, OutputNotEmptyError, FileNotFoundError, ValueError) as error:
        print(f"fedreid-prepare: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
