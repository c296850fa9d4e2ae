"""A trained re-ID model in one file: what the server writes as ``model.pt`` and each site as its own model.

One format for both, readable with ``torch.load(weights_only=True)`` (tensors, strings and numbers
only, no pickled code), and complete without the run's Hydra config: the weights plus the
``ModelSpec`` that rebuilds the network, and where the numbers came from.

``batchnorm`` says whether the file's BatchNorm statistics belong to the weights:

* ``"own"``: they do (``bn_stats=average``, where the server averages them, or a site's own model);
* ``"missing"``: the run kept them on the sites (``bn_stats=local``), so the server never learnt
  them; whoever uses the model must first recompute them on images of its own cameras
  (``reid.features.adapt_batchnorm``).

A backbone registered in the training process (``register_backbone``) is stored by name only: the
file never carries code, so the loading process must register the same network first.

Loading never runs code that a file names: the network is a torchvision model, ``resnet10`` or a
backbone registered in the loading process. A file that names a ``backbone_factory`` (a crafted
one may name any ``module:function``, or a pickle on the box) is refused, naming the file and the
way out, unless the factory's module is one the user allowed (``--backbone-module`` on the model
tools, ``backbone_modules`` in ``fedreid.load_model``) or the backbone is registered already.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from reid.atomic import torch_save_atomically
from reid.backbones import check_backbone, module_allowed, registered_factory
from reid.models import BN_COUNTER_SUFFIX, BN_STATS_SUFFIXES, CLASSIFIER_PREFIX, ModelSpec, ReIDNet

MODEL_FORMAT = "fedreid-model"
FORMAT_VERSION = 1
BATCHNORM_OWN, BATCHNORM_MISSING = "own", "missing"
SITE_MODELS_DIR = "site-models"  # in a simulation's run folder: each site's own model, <site>.pt


class ModelFileError(ValueError):
    """A file that is not a fedreid model, or a model this process cannot rebuild."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about its weights, beside the ``ModelSpec``."""

    spec: ModelSpec
    algorithm: str = ""
    round: int = 0
    batchnorm: str = BATCHNORM_OWN  # "own" or "missing" (see the module's docstring)
    bn_stats: str = "average"  # the run's policy
    site: str = ""  # "" for the global model; else the site whose model this is
    run: str = ""  # the run folder's name (the run tag the sites saw)
    mAP: float | None = None  # the global model: mean mAP of its last evaluation; a site: its own mAP
    metrics: dict[str, float] = field(default_factory=dict)  # the evaluation behind ``mAP`` (fractions)
    eval_batch_size: int = 128
    backbone_source: str = ""  # "registered" when the backbone came from register_backbone
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # FedKLPR: the site's pruning masks

    @property
    def needs_batchnorm(self) -> bool:
        return self.batchnorm == BATCHNORM_MISSING

    @property
    def kept_fraction(self) -> float:
        """Share of the masked weights still in use (1.0 without masks)."""
        total = sum(m.numel() for m in self.masks.values())
        return float(sum(int(m.sum()) for m in self.masks.values()) / total) if total else 1.0


def _storable_spec(spec: ModelSpec) -> tuple[ModelSpec, str]:
    """The spec as stored, and where its backbone comes from. A factory pickled by
    ``fedreid.simulate`` (a ``.pkl`` path on the training machine) is code, so it is dropped and the
    backbone named as registered; an importable ``module:function`` stays (it names installed code)."""
    factory = spec.backbone_factory or ""  # None where a transport carried it empty
    registered = bool(factory) or registered_factory(spec.backbone) is not None
    spec = replace(spec, backbone_factory="" if factory.endswith(".pkl") else factory)
    return spec, "registered" if registered else ""


def save_model(path: Path, state: dict[str, torch.Tensor], info: ModelInfo) -> Path:
    """Write ``state`` (the classifier dropped: identities are a site's own) with ``info``,
    atomically: a crash leaves the previous file."""
    spec, source = _storable_spec(info.spec)
    meta = {f.name: getattr(info, f.name) for f in fields(info) if f.name not in ("spec", "masks")}
    meta["backbone_source"] = info.backbone_source or source
    payload = {
        "format": MODEL_FORMAT, "version": FORMAT_VERSION, "model": asdict(spec), "info": meta,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()
                       if not k.startswith(CLASSIFIER_PREFIX)},
        "masks": {k: m.detach().cpu().bool() for k, m in info.masks.items()},
    }
    return torch_save_atomically(payload, path)


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """The weights and the info of a model file, refused with a reason when it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFileError(f"model file {path} not found; a run writes model.pt into its run folder, a site "
                             f"<state-dir>/models/<run>.pt, a simulation <run folder>/site-models/<site>.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickled code, a truncated file, not torch at all
        raise ModelFileError(f"{path} is not a readable model file ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200]})") from error
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        hint = " (global_model.pt is the resume checkpoint; use model.pt)" if "round" in (payload or {}) else ""
        raise ModelFileError(f"{path} is not a fedreid model file{hint}")
    if int(payload.get("version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer fedreid (format {payload['version']}); upgrade to load it")
    known = {f.name for f in fields(ModelSpec)}
    spec = ModelSpec(**{k: v for k, v in payload["model"].items() if k in known})
    info_fields = {f.name for f in fields(ModelInfo)}
    meta = {k: v for k, v in payload.get("info", {}).items() if k in info_fields}
    return payload["state_dict"], ModelInfo(spec=spec, masks=dict(payload.get("masks", {})), **meta)


def trusted_spec(info: ModelInfo, path: Path | str, allowed_modules: frozenset[str] = frozenset()) -> ModelSpec:
    """The file's ModelSpec with what it may not decide taken out: a factory it names stays only when
    its module is allowed; otherwise a backbone registered here is used, or the file is refused."""
    spec = info.spec
    factory = spec.backbone_factory or ""
    registered = registered_factory(spec.backbone) is not None
    if factory:
        module = factory.partition(":")[0]
        if not factory.endswith(".pkl") and ":" in factory and module_allowed(module, allowed_modules):
            return spec
        if not registered:
            way_out = (f"--backbone-module {module} (fedreid.load_model(path, backbone_modules=[{module!r}]))"
                       if not factory.endswith(".pkl") else
                       f"fedreid.register_backbone({spec.backbone!r}, factory) in the loading process")
            raise ModelFileError(
                f"{path} names code to build its backbone ({factory!r}); a model file never runs code on this "
                f"box. If you trust that code, allow it with {way_out}")
        spec = replace(spec, backbone_factory="")
    if info.backbone_source == "registered" and not registered:
        raise ModelFileError(
            f"{path} was trained with backbone {spec.backbone!r}, a network registered in the training process "
            f"(model files carry no code). Register the same network under that name before loading: "
            f"fedreid.register_backbone({spec.backbone!r}, factory)")
    try:
        check_backbone(spec.backbone, spec.backbone_factory)
    except ValueError as error:
        raise ModelFileError(f"{path}: {error}") from None
    if not 16 <= spec.height <= 4096 or not 16 <= spec.width <= 4096 or not 1 <= spec.bottleneck_dim <= 65536:
        raise ModelFileError(f"{path}: input {spec.height}x{spec.width} or bottleneck {spec.bottleneck_dim} is "
                             f"outside what a re-ID model uses")
    return spec


def build_saved_model(path: str | Path, allowed_modules: frozenset[str] | set[str] = frozenset()
                      ) -> tuple[ReIDNet, ModelInfo]:
    """The network of a model file, with its weights, in eval mode; ``allowed_modules``: the modules
    whose factories a file may name (see the module's docstring)."""
    state, info = read_model_file(path)
    info = replace(info, spec=trusted_spec(info, path, frozenset(allowed_modules)))
    try:
        net = ReIDNet(info.spec)
    except (ImportError, ValueError, TypeError) as error:
        raise ModelFileError(f"{path}: cannot build backbone {info.spec.backbone!r}: {error}") from error
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        raise ModelFileError(f"{path}: its weights do not fit backbone {info.spec.backbone!r} "
                             f"({str(error).splitlines()[-1].strip()[:200]}); was the registered network changed?") from None
    allowed = (BN_COUNTER_SUFFIX, *BN_STATS_SUFFIXES) if info.needs_batchnorm else (BN_COUNTER_SUFFIX,)
    missing = [k for k in result.missing_keys if not k.endswith(allowed)]
    if result.unexpected_keys or missing:
        raise ModelFileError(f"{path}: its weights do not fit backbone {info.spec.backbone!r} (missing "
                             f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); was the registered network "
                             f"changed?")
    return net.eval(), info
