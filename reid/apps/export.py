"""``fedreid-export``: a model file as ONNX or TorchScript, for serving beside the cameras.

The graph takes ``ReIDModel.preprocess``'s batch (dynamic batch size) and returns the
L2-normalised embedding of one pass. A model without BatchNorm statistics of its own (the global
model of a ``bn_stats=local`` run) is exported only after ``--adapt-on FOLDER`` recomputes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reid.apps.common import configure_logging, model_arguments, open_model
from reid.export import FORMATS, export_model
from reid.inference import image_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedreid-export", description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--adapt-on", type=Path, default=None,
                        help="a folder of the target cameras' images: recompute BatchNorm statistics on them first")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    model = open_model(args)
    if args.adapt_on is not None:
        count = model.adapt_batchnorm(image_files(args.adapt_on))
        print(f"note: BatchNorm statistics recomputed on {count} images of {args.adapt_on}", file=sys.stderr)
    elif model.needs_batchnorm:
        sys.exit(f"error: {args.model} has no BatchNorm statistics (bn_stats=local: they stayed on the sites); "
                 f"export a site's own model, or pass --adapt-on FOLDER with images of the target cameras")
    try:
        path = export_model(model.net, args.format, args.out)
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input 'images' float32 [B, 3, "
          f"{model.info.spec.height}, {model.info.spec.width}], output 'embeddings' [B, {model.info.spec.bottleneck_dim}]")


if __name__ == "__main__":
    main()
