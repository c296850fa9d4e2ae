"""The Python API behind ``import fedreid``: simulate, load_run, compare (load_model: reid/inference.py).

``simulate`` builds exactly the request ``fedreid-sim`` builds from its flags and runs it; a run
folder, from a simulation or a deployment, reads back with ``load_run``. Errors are typed
(``FedReIDError`` and its subclasses) and carry the command-line tools' messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from reid.backbones import registered_factory, save_factory
from reid.saved_model import SITE_MODELS_DIR
from server.config import compose_config
from server.outputs import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, TABLE_KEYS, site_facts
from server.report import REPORT_FILE
from server.simulate import SimulationError, parse_args, run_simulation


class FedReIDError(RuntimeError):
    """Anything the Python API refuses or could not finish; the message says what and where."""


class SimulationFailed(FedReIDError):
    """The simulated federation did not complete."""


class RunFolderError(FedReIDError):
    """A folder that is not a finished (or running) fedreid run."""


@dataclass(frozen=True)
class RunResult:
    """One run folder read back: its configuration, every round's record, the final table."""

    run_dir: Path
    history: list[dict[str, Any]] = field(repr=False)  # metrics.jsonl: one record per round
    config_text: str = field(default="", repr=False)  # config.yaml as the server composed it

    @property
    def checkpoint(self) -> Path | None:
        """The global model of the last recorded round (``global_model.pt``), if written."""
        path = self.run_dir / CHECKPOINT_FILE
        return path if path.is_file() else None

    @property
    def model(self) -> Path | None:
        """``model.pt``: the global model, for ``fedreid.load_model``, if written."""
        path = self.run_dir / MODEL_FILE
        return path if path.is_file() else None

    @property
    def site_models(self) -> dict[str, Path]:
        """A simulation's per-site models (``site-models/<site>.pt``), by site name."""
        return {p.stem: p for p in sorted((self.run_dir / SITE_MODELS_DIR).glob("*.pt"))}

    @property
    def report(self) -> Path | None:
        """``report.html``: table, figures, bytes, incidents and configuration in one page."""
        path = self.run_dir / REPORT_FILE
        return path if path.is_file() else None

    @property
    def rounds(self) -> int:
        return max((record["round"] for record in self.history), default=0)

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per site of the last evaluation: site, training images, identities (or the
        clusters of an unsupervised site) and the metrics in percent, as in ``results.md``."""
        evaluations = [r for r in self.history if r.get("evaluate")]
        if not evaluations:
            return []
        trained = site_facts(self.history)
        rows = []
        for site, metrics in sorted(evaluations[-1]["evaluate"]["sites"].items()):
            info = trained.get(site, {})
            row: dict[str, Any] = {"site": site, "train images": int(info.get("num-examples", 0))}
            row["identities"] = int(info["num-identities"]) if "num-identities" in info else None
            if "clusters" in info:
                row["clusters"] = int(info["clusters"])
            row.update({key: 100 * metrics[key] for key in TABLE_KEYS if key in metrics})
            rows.append(row)
        return rows

    @property
    def mean(self) -> dict[str, float]:
        """The mean over sites of the last evaluation (fractions, as in metrics.jsonl)."""
        evaluations = [r for r in self.history if r.get("evaluate")]
        return dict(evaluations[-1]["evaluate"]["mean"] or {}) if evaluations else {}

    def dataframe(self) -> Any:
        """``table`` as a pandas DataFrame (pandas is not a dependency: install it to use this)."""
        try:
            import pandas
        except ImportError as error:
            raise FedReIDError("dataframe() needs pandas (pip install pandas); .table gives the same rows") from error
        return pandas.DataFrame(self.table)


def load_run(path: str | Path) -> RunResult:
    """Read a run folder written by a simulation or a deployment (``outputs/<time>-<algorithm>-run<id>``)."""
    folder = Path(path).expanduser().resolve()
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise RunFolderError(f"{folder} is not a fedreid run folder: it has no metrics.jsonl (a run folder holds "
                             f"metrics.jsonl, {CONFIG_FILE}, results.md and {CHECKPOINT_FILE})")
    try:
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{metrics} is damaged: {error}") from None
    config = folder / CONFIG_FILE
    return RunResult(folder, history, config.read_text() if config.is_file() else "")


def _overrides(overrides: Mapping[str, Any] | str | None, rounds: int | None) -> str:
    parts = [overrides] if isinstance(overrides, str) else [f"{k}={v}" for k, v in (overrides or {}).items()]
    if rounds is not None:
        parts.append(f"federation.rounds={int(rounds)}")
    return " ".join(p for p in parts if p)


def _preflight(algorithm: str, profile: str, overrides: str, sites: Path, generate: bool) -> Any:
    """Refuse, before any process starts, what would only fail inside the run: an unknown preset or
    profile, a bad override, a sites folder that is not there (an unknown backbone: ``parse_args``).
    Returns the composed configuration."""
    try:
        cfg = compose_config({"algorithm": algorithm, "profile": profile, "overrides": overrides})
    except Exception as error:  # Hydra raises several types; each names what it could not find
        raise FedReIDError(f"cannot compose algorithm={algorithm!r} profile={profile!r} overrides={overrides!r}: "
                           f"{error}") from None
    if not generate and not sites.is_dir():
        raise FedReIDError(f"sites folder {sites.resolve()} does not exist; it must hold one folder per site, "
                           f"each with train/, query/ and gallery/ (or pass generate=True for synthetic sites)")
    return cfg


def _ship_registered_backbone(cfg: Any, output_dir: Path) -> str:
    """The override that lets the simulation's processes build a backbone registered in this one:
    its factory, written by value next to the runs (empty when no registered backbone is used)."""
    name = cfg.model.backbone
    if cfg.model.get("backbone_factory") or registered_factory(name) is None:
        return ""
    path = save_factory(name, output_dir.resolve() / "backbones" / f"{name}.pkl")
    return f"model.backbone_factory={path}"


def simulate(algorithm: str = "fedpav", sites: str | Path = "data/synthetic", *, rounds: int | None = None,
             num_sites: int | None = None, profile: str = "demo", overrides: Mapping[str, Any] | str | None = None,
             seed: int = 0, output_dir: str | Path = "outputs", federation: str = "synthetic",
             generate: bool = True, flwr_home: str | Path | None = None, ray_address: str | None = None,
             gpus_per_site: float = 0.0) -> RunResult:
    """Run one federation on the Ray simulation engine, as ``fedreid-sim`` does, and read it back.

    ``sites`` is a folder with one sub-folder per site (generated synthetic sites when missing and
    ``generate``); ``overrides`` are Hydra overrides as a mapping (``{"train.lr": 0.05}``) or a string.
    ``ray_address``: HOST:PORT of a running Ray cluster to run the sites on (``fedreid-sim --ray-address``)."""
    argv = ["--algorithm", algorithm, "--profile", profile, "--seed", str(seed), "--sites-root", str(sites),
            "--output-dir", str(output_dir), "--federation", federation]
    if num_sites is not None:
        argv += ["--sites", str(num_sites)]
    if flwr_home is not None:
        argv += ["--flwr-home", str(flwr_home)]
    if not generate:
        argv.append("--no-generate")
    if ray_address is not None:
        argv += ["--ray-address", ray_address]
    if gpus_per_site:
        argv += ["--gpus-per-site", str(gpus_per_site)]
    text = _overrides(overrides, rounds)
    cfg = _preflight(algorithm, profile, text, Path(sites), generate)
    text = " ".join(part for part in (text, _ship_registered_backbone(cfg, Path(output_dir))) if part)
    if text:
        argv += ["--overrides", text]
    try:
        request = parse_args(argv)
        folder = run_simulation(request)
    except SimulationError as error:
        raise SimulationFailed(str(error)) from None
    except (ValueError, FileExistsError, FileNotFoundError) as error:  # bad names, layouts, overrides
        raise FedReIDError(str(error)) from error
    return load_run(folder)


def compare(algorithms: Sequence[str], seeds: Sequence[int] = (0,), **kwargs: Any) -> dict[str, list[RunResult]]:
    """Every algorithm once per seed on the same sites (``simulate``'s keyword arguments apply to
    all); {algorithm: [result per seed]}. ``bench/compare_algorithms.py`` adds tables and figures."""
    return {algorithm: [simulate(algorithm, seed=seed, **kwargs) for seed in seeds] for algorithm in algorithms}
