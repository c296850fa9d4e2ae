"""Compose the run's configuration with Hydra from ``conf/``, steered by Flower's run config.

Run-config keys (``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``flwr run
--run-config``) map onto Hydra as follows:

* ``algorithm``  -> config group ``algorithm=<name>``  (conf/algorithm/<name>.yaml)
* ``profile``    -> config group ``profile=<name>``    (conf/profile/<name>.yaml)
* ``overrides``  -> space-separated Hydra overrides, e.g. ``"federation.rounds=20 model=small"``
* ``output-dir`` -> ``output.dir`` when not empty
* ``resume``     -> not Hydra: continue the run folder it names (or the ``latest`` one) with the
  configuration saved there (server/resume.py)

``sites-root`` is read by the simulated sites themselves (see clients/site.py).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import conf
from reid.config import SiteRunSpec
from reid.data.transforms import AugmentSpec
from reid.divergence import KLLConfig
from reid.models import ModelSpec
from reid.pruning import CRRConfig, PruningConfig
from reid.raf import RAFConfig
from reid.style import StyleConfig
from reid.train import TrainConfig
from reid.unsupervised import UnsupervisedConfig
from strategies.pruning_plan import PruningSchedule, RecoveryRule
from strategies.update_codec import CompressionSpec
from strategies.validation import UNSEEN_PROTOCOLS

CONF_DIR = Path(conf.__file__).resolve().parent


def hydra_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Translate Flower run-config values into Hydra override strings."""
    overrides = []
    if run_config.get("algorithm"):
        overrides.append(f"algorithm={run_config['algorithm']}")
    if run_config.get("profile"):
        overrides.append(f"profile={run_config['profile']}")
    if run_config.get("output-dir"):
        overrides.append(f"output.dir={run_config['output-dir']}")
    overrides += shlex.split(str(run_config.get("overrides", "")))
    return overrides


def compose_config(run_config: Mapping[str, Any]) -> DictConfig:
    """The composed, resolved configuration for this run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=hydra_overrides(run_config))
    OmegaConf.resolve(cfg)
    return cfg


def _section(cfg: DictConfig, name: str, drop: tuple[str, ...] = (), keep: tuple[str, ...] | None = None
             ) -> dict[str, Any]:
    """A config section as a dict, without ``drop``, or with only ``keep``."""
    values = OmegaConf.to_container(cfg[name], resolve=True)
    assert isinstance(values, dict)
    return {k: v for k, v in values.items() if k not in drop and (keep is None or k in keep)}


SITE_PRUNING_KEYS = ("enabled", "value_dtype")  # what a site needs of pruning (the server prunes)
SITE_CRR_KEYS = ("enabled", "holdout_fraction", "min_identities")  # what a site needs of CRR (the server judges)


def _scales(value: Any) -> str:
    """A YAML list of resolution scales (or a string of them) as the flat string sites receive."""
    items = value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else str(value).split()
    return " ".join(str(float(item)) for item in items)


def check_unsupervised(cfg: DictConfig) -> None:
    """FedUReID sites train without labels or a classifier: refuse the parts that need them."""
    algo = cfg.algorithm
    if not algo.unsupervised.enabled:
        return
    clashes = [name for name, on in (
        (f"weighting={algo.weighting} (only size)", algo.weighting != "size"),
        ("kd.enabled", algo.kd.enabled), ("kll.enabled", algo.kll.enabled), ("pruning.enabled", algo.pruning.enabled),
        (f"clustering.method={algo.clustering.method} (only none or singletons)",
         algo.clustering.method not in ("none", "singletons")),
    ) if on]
    if clashes:
        raise ValueError(f"algorithm {algo.name}: unsupervised training does not combine with {', '.join(clashes)}")


def pruning_specs(cfg: DictConfig) -> tuple[PruningSchedule, RecoveryRule]:
    """The server's part of FedKLPR's pruning and Cross-Round Recovery."""
    schedule = PruningSchedule(**_section(cfg.algorithm, "pruning", drop=("value_dtype",)))
    recovery = RecoveryRule(**_section(cfg.algorithm, "crr", drop=SITE_CRR_KEYS[1:]))
    return schedule, recovery


def compression_spec(cfg: DictConfig) -> CompressionSpec:
    """Compressed updates (``algorithm.compression``), off unless a preset turns them on."""
    return CompressionSpec(**_section(cfg.algorithm, "compression"))


def site_run_spec(cfg: DictConfig) -> SiteRunSpec:
    """The part of the configuration every site receives each round."""
    check_unsupervised(cfg)
    return SiteRunSpec(
        model=ModelSpec(**_section(cfg, "model", drop=("pretrained",))),
        train=TrainConfig(**_section(cfg, "train")),
        augment=AugmentSpec(**_section(cfg, "augment")),
        kll=KLLConfig(**_section(cfg.algorithm, "kll")),
        pruning=PruningConfig(**_section(cfg.algorithm, "pruning", keep=SITE_PRUNING_KEYS)),
        crr=CRRConfig(**_section(cfg.algorithm, "crr", keep=SITE_CRR_KEYS)),
        unsupervised=UnsupervisedConfig(**_section(cfg.algorithm, "unsupervised"), rounds=int(cfg.federation.rounds)),
        raf=RAFConfig(**{**_section(cfg.algorithm, "raf"), "scales": _scales(cfg.algorithm.raf.scales)}),
        style=StyleConfig(**_section(cfg.algorithm, "style")),
        bn_stats=str(cfg.algorithm.bn_stats),
        seed=int(cfg.seed),
        verify_images=bool(cfg.data.verify_images),
        eval_batch_size=int(cfg.data.eval_batch_size),
        eval_query_scales=_scales(cfg.data.eval_query_scales),
    )


@dataclass(frozen=True)
class FederationSettings:
    """How the server runs the rounds."""

    rounds: int
    eval_every: int
    eval_at_start: bool
    min_sites: int
    fraction_train: float
    fraction_evaluate: float
    round_timeout_s: float
    poll_interval_s: float = 0.1
    report_every_s: float = 60.0
    evaluate_with_next_round: bool = True
    held_out: tuple[str, ...] = ()  # site names that never train; each evaluation also ranks them (``unseen``)
    unseen_protocols: tuple[str, ...] = UNSEEN_PROTOCOLS  # how held-out sites rank (strategies/held_out.py)

    def evaluates_after(self, server_round: int) -> bool:
        """Federated evaluation every k rounds and always after the last one."""
        return self.eval_every > 0 and (server_round % self.eval_every == 0 or server_round == self.rounds)


def federation_settings(cfg: DictConfig) -> FederationSettings:
    values = _section(cfg, "federation")
    settings = FederationSettings(**{**values, "held_out": tuple(str(n) for n in values.get("held_out") or ()),
                                     "unseen_protocols": tuple(str(p) for p in values.get("unseen_protocols",
                                                                                           UNSEEN_PROTOCOLS))})
    if not settings.unseen_protocols or set(settings.unseen_protocols) - set(UNSEEN_PROTOCOLS):
        raise ValueError(f"federation.unseen_protocols: choose from {list(UNSEEN_PROTOCOLS)}, got "
                         f"{list(settings.unseen_protocols)}")
    if settings.rounds < 1 or settings.min_sites < 1:
        raise ValueError(f"federation.rounds and federation.min_sites must be >= 1, got {settings}")
    if settings.round_timeout_s <= 0 or settings.poll_interval_s <= 0 or settings.report_every_s <= 0:
        raise ValueError(f"federation.round_timeout_s, poll_interval_s and report_every_s must be > 0, got {settings}")
    return settings
