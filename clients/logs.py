"""Site-side logging: progress to stderr, which the SuperNode's log (or Ray, in simulation) shows."""

from __future__ import annotations

import logging
import sys


def configure_logging() -> None:
    """INFO and above of the ``clients`` and ``reid`` loggers, with a time stamp; idempotent."""
    for name in ("clients", "reid"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
