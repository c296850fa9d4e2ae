"""What the three model tools share: loading the model and making it usable on the target cameras."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from reid.data.dataset import ReIDData
from reid.inference import ReIDModel, load_model
from reid.saved_model import ModelFileError



def model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="a model file: <run folder>/model.pt, a site's <state-dir>/models/<run>.pt, or a "
                             "simulation's <run folder>/site-models/<site>.pt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the first GPU, else the CPU)")
    parser.add_argument("--backbone-module", action="append", default=[], metavar="MODULE",
                        help="import this module first (it registers the backbone a model was trained with) and let "
                             "the model file name a backbone factory from it; a model file runs no other code")


def open_model(args: argparse.Namespace) -> ReIDModel:
    """The model named on the command line; a clear message and exit 2 when it cannot be loaded."""
    import importlib

    for module in args.backbone_module:
        importlib.import_module(module)
    try:
        return load_model(args.model, args.device, backbone_modules=args.backbone_module)
    except (ModelFileError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


def adapt_to(model: ReIDModel, data: ReIDData, say: bool = True) -> str:
    """Recompute BatchNorm statistics on the target folder's images when the model has none of its
    own (a global model of a ``bn_stats=local`` run); returns what was done, for the report."""
    if not model.needs_batchnorm:
        return ""
    samples = data.train or data.gallery
    split = "training" if data.train else "gallery"
    count = model.adapt_batchnorm([s.path for s in samples])
    note = (f"BatchNorm statistics recomputed on the {count} {split} images of {data.root} (the model's stayed "
            f"on the sites, bn_stats=local)")
    if say:
        print(f"note: {note}", file=sys.stderr)
    return note


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
