"""What a deployed site lets a run ask of it: limits on its work, disk and memory, and what leaves it.

The server chooses every training knob, so a server that is hostile (or just wrong) could ask a
site for 100,000 local epochs, 1024x512 images, batches of two, or its BatchNorm statistics. The
site's operator sets the limits below on ``fedreid-client``'s command line (the worker gets them on
its own command line, never from a message); every round's settings are checked against them
before any work starts, and a run beyond them is refused with a reason the server is told and
that names the flag that would allow it. Simulations, the researcher's own machine, check nothing.

Defaults are the most private setting each algorithm allows and limits that the published
settings (FedReID, FedUReID, FedKLPR, RAF, CCST at 256x128) stay within.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from clients.public_errors import PublicError

if TYPE_CHECKING:  # torch is imported by the worker after its first answer, not before
    from reid.config import SiteRunSpec

POLICY_KEY = "site-policy"  # the worker's node_config: this policy as JSON
MAX_SCALES = 4


class SiteRefusal(PublicError, PermissionError):
    """The run asks for something beyond this site's policy; the message is meant for the server."""


@dataclass(frozen=True)
class SitePolicy:
    """The operator's limits (see the module's docstring); each field is a ``fedreid-client`` flag."""

    max_task_seconds: float = 3600.0
    max_epochs: int = 20
    max_image_side: int = 512
    max_batch_size: int = 256
    min_batch_size: int = 16
    max_memory_fraction: float = 0.6
    min_free_mb: float = 2048.0
    keep_runs: int = 3
    require_bn_stats: str = "local"
    allow_style_sharing: bool = False

    # -- the command line ------------------------------------------------------------------------

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        d = SitePolicy()
        group = parser.add_argument_group("site limits (what a run may ask of this site)")
        group.add_argument("--max-task-seconds", type=float, default=d.max_task_seconds,
                           help=f"stop any one task after this long and answer it as failed (default {d.max_task_seconds:g})")
        group.add_argument("--max-epochs", type=int, default=d.max_epochs,
                           help=f"most local epochs a round may ask for, supervised or not (default {d.max_epochs})")
        group.add_argument("--max-image-side", type=int, default=d.max_image_side,
                           help=f"largest model.height / model.width in pixels (default {d.max_image_side})")
        group.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                           help=f"largest training or evaluation batch (default {d.max_batch_size})")
        group.add_argument("--min-batch-size", type=int, default=d.min_batch_size,
                           help=f"smallest training batch: a tiny batch makes an update a function of a few images "
                                f"(default {d.min_batch_size})")
        group.add_argument("--max-memory-fraction", type=float, default=d.max_memory_fraction,
                           help=f"decoded images may take at most this share of the memory available when a round "
                                f"starts (default {d.max_memory_fraction})")
        group.add_argument("--min-free-mb", type=float, default=d.min_free_mb,
                           help=f"free space to leave on the state folder's disk; below it the site writes nothing "
                                f"and refuses rounds (default {d.min_free_mb:g})")
        group.add_argument("--keep-runs", type=int, default=d.keep_runs,
                           help=f"state and model files of this many newest runs are kept (default {d.keep_runs})")
        group.add_argument("--require-bn-stats", choices=("local", "any"), default=d.require_bn_stats,
                           help="local (default): refuse runs that would send this site's BatchNorm statistics "
                                "(bn_stats=average), or for source-only rankings of held-out sites; any: allow them")
        group.add_argument("--allow-style-sharing", action="store_true",
                           help="let style-sharing runs (feddg) send this site's per-camera colour statistics "
                                "(33 numbers per camera, never an image); off by default")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SitePolicy":
        policy = cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
        policy.check()
        return policy

    def arguments(self) -> list[str]:
        """This policy as the command-line flags that give it (fedreid-client hands them to its worker)."""
        out: list[str] = []
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                out += [flag] if value else []
            else:
                out += [flag, str(value)]
        return out

    def check(self) -> None:
        if self.max_task_seconds <= 0 or self.max_epochs < 1 or self.max_image_side < 16 or self.keep_runs < 1:
            raise ValueError(f"site limits out of range: {self}")
        if not 0 < self.max_memory_fraction <= 1 or not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError(f"site limits out of range: {self}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> "SitePolicy | None":
        """The worker's policy, or None outside a deployed worker (a simulation)."""
        text = node_config.get(POLICY_KEY)
        return cls(**json.loads(str(text))) if text else None

    # -- a round's settings ----------------------------------------------------------------------

    def refusal(self, spec: SiteRunSpec) -> str | None:
        """Why this site will not run a round with ``spec``, or None."""
        from reid.data.resolution import parse_scales

        model, train = spec.model, spec.train
        epochs = [("train.local_epochs", train.local_epochs)]
        if spec.unsupervised.enabled:
            epochs += [("algorithm.unsupervised.epochs_first", spec.unsupervised.epochs_first),
                       ("algorithm.unsupervised.epochs_later", spec.unsupervised.epochs_later)]
        for knob, value in epochs:
            if int(value) > self.max_epochs:
                return f"{knob}={value} exceeds this site's limit of {self.max_epochs} epochs (--max-epochs)"
        for knob, value in (("model.height", model.height), ("model.width", model.width)):
            if not 16 <= int(value) <= self.max_image_side:
                return f"{knob}={value} is outside this site's 16..{self.max_image_side} pixels (--max-image-side)"
        if not self.min_batch_size <= train.batch_size <= self.max_batch_size:
            return (f"train.batch_size={train.batch_size} is outside this site's {self.min_batch_size}.."
                    f"{self.max_batch_size} (--min-batch-size, --max-batch-size)")
        if not 1 <= spec.eval_batch_size <= self.max_batch_size:
            return f"data.eval_batch_size={spec.eval_batch_size} exceeds this site's {self.max_batch_size} (--max-batch-size)"
        for knob, text in (("data.eval_query_scales", spec.eval_query_scales), ("algorithm.raf.scales", spec.raf.scales)):
            try:
                scales = parse_scales(text)
            except ValueError:
                return f"{knob} is not a list of scales in (0, 1)"
            if len(scales) > MAX_SCALES:
                return f"{knob} lists {len(scales)} scales; this site evaluates at most {MAX_SCALES}"
        if spec.bn_stats != "local" and self.require_bn_stats == "local":
            return (f"bn_stats={spec.bn_stats} would send this site's BatchNorm statistics; it keeps them "
                    "(--require-bn-stats any allows it)")
        if spec.style.enabled and spec.style.share and not self.allow_style_sharing:
            return "style sharing would send this site's image statistics (--allow-style-sharing allows it)"
        return None

    def check_spec(self, spec: SiteRunSpec) -> None:
        reason = self.refusal(spec)
        if reason is not None:
            raise SiteRefusal(reason)

    def check_memory(self, images: int, height: int, width: int) -> None:
        """Refuse a round whose decoded images would not fit the share of memory the operator allows."""
        needed = images * 3 * height * width
        available = memory_available()
        if available is not None and needed > self.max_memory_fraction * available:
            raise SiteRefusal(f"{images} images at {height}x{width} take {needed / 1e9:.1f} GB decoded; this site "
                              f"allows {self.max_memory_fraction:.0%} of its {available / 1e9:.1f} GB available "
                              "(--max-memory-fraction)")

    def check_disk(self, folder: Path, writing: int = 0) -> None:
        """Refuse to write ``writing`` more bytes under ``folder`` when that would leave less than the floor."""
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free - writing < self.min_free_mb * 1e6:
            raise SiteRefusal(f"the site's state disk has {free / 1e6:.0f} MB free and this round would write "
                              f"{writing / 1e6:.0f} MB; it keeps at least {self.min_free_mb:.0f} MB free (--min-free-mb)")


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
