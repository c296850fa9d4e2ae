"""fedreid from Python: run a federation, read a finished run, compare presets.

    import fedreid
    result = fedreid.simulate(algorithm="fedpav", sites="data/synthetic", rounds=20)
    result.table          # per-site Rank-1/5/10, mAP, mINP of the last evaluation
    model = fedreid.load_model(result.run_dir / "model.pt")   # embed and rank your own crops

    @fedreid.register_backbone("tiny")   # your own nn.Module as the backbone: model.backbone=tiny
    def tiny() -> torch.nn.Module: ...

A thin facade over the command-line tools: the same Flower simulation as ``fedreid-sim``, the same
run folders as a deployment writes.
"""

from fedreid.api import FedReIDError, RunFolderError, RunResult, SimulationFailed, compare, load_run, simulate
from reid.backbones import register_backbone
from reid.inference import ReIDModel, Ranking, load_model

__all__ = ["FedReIDError", "RunFolderError", "Ranking", "ReIDModel", "RunResult", "SimulationFailed", "compare",
           "load_model", "load_run", "register_backbone", "simulate"]
