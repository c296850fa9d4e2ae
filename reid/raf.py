"""RAF for re-ID: multi-resolution knowledge distillation inside every local step (after Lee, Cho,
Lee, Lim, "Resolution drift", arXiv 2507.23461, 2025, where it distils pose heatmaps).

Each training batch x is also passed at lower resolutions (``scales``, e.g. ½ and ¼: shrunk and
blown back up to the input size, reid/data/resolution.py). The full-resolution pass is the teacher,
detached; every lower-resolution pass is a student trained towards it on

* the backbone's last spatial feature map, the re-ID analogue of the paper's heatmaps
  (``map_loss``): ``nmse`` = ||s - t||² / ||t||² per image, or ``attention`` = the squared
  distance of the L2-normalised spatial attention maps mean_c(f²) (Zagoruyko & Komodakis);
* the embedding before dropout (``embed_loss``): ``cosine`` = 1 - cos(s, t), or
  ``similarity_kl`` = KL between the teacher's and the student's softmax over the similarities to
  the other images of the batch (temperature ``similarity_tau``).

The terms are averaged over the scales and weighted by ``map_weight`` / ``embed_weight``; students
get no identity loss of their own, so what they learn comes from the teacher. ``mode: augment`` is
the baseline that separates distillation from merely seeing low resolutions: the same extra passes,
trained with the task's own loss (identity cross-entropy, or the cluster memory's) instead.

Cost: every scale adds one forward and one backward pass of the whole network per batch; the
reply reports image passes so the bench can put a number on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from reid.data.resolution import degrade, parse_scales

RAF_MODES = ("distill", "augment")
MAP_LOSSES = ("nmse", "attention")
EMBED_LOSSES = ("cosine", "similarity_kl")


@dataclass(frozen=True)
class RAFConfig:
    """Multi-resolution training knobs (off unless ``enabled``)."""

    enabled: bool = False
    mode: str = "distill"
    scales: str = "0.5 0.25"  # student resolutions, space-separated, each in (0, 1)
    map_weight: float = 1.0
    map_loss: str = "nmse"
    embed_weight: float = 1.0
    embed_loss: str = "cosine"
    similarity_tau: float = 0.1

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, RAF_MODES), ("map_loss", self.map_loss, MAP_LOSSES),
                                     ("embed_loss", self.embed_loss, EMBED_LOSSES)):
            if value not in allowed:
                raise ValueError(f"raf.{name} must be one of {allowed}, got {value!r}")
        if self.enabled and not parse_scales(self.scales):
            raise ValueError("raf.scales names no resolution; e.g. '0.5 0.25'")


def map_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "nmse") -> torch.Tensor:
    """Mean over the batch of the distance of two [B, C, h, w] feature maps; 0 when they are equal."""
    student, teacher = student.float(), teacher.float()
    if kind == "attention":
        student, teacher = (F.normalize(m.square().mean(1).flatten(1), dim=1) for m in (student, teacher))
        return (student - teacher).square().sum(1).mean()
    student, teacher = student.flatten(1), teacher.flatten(1)
    return ((student - teacher).square().sum(1) / teacher.square().sum(1).clamp_min(1e-12)).mean()


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine",
                       tau: float = 0.1) -> torch.Tensor:
    """Mean over the batch of the embedding distance; 0 when the embeddings are equal."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    off_diagonal = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    student_logits = (s @ t.t() / tau)[off_diagonal].view(len(s), -1)  # a student against the teacher's batch
    teacher_logits = (t @ t.t() / tau)[off_diagonal].view(len(s), -1)
    return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                    reduction="batchmean")


class MultiResolution:
    """The lower-resolution copies of a training batch and their loss.

    Teacher and students go through the network as one batch ``[x; x at s1; x at s2 ...]``, so
    BatchNorm normalises every resolution with the same statistics, as it will at test time with
    its running ones. (Separate passes, each with its own batch statistics, taught students to
    match the teacher only under statistics that evaluation never uses: on a tiny site the
    eval-mode gap between ¼ and full resolution grew 13x over three epochs instead of shrinking.)"""

    def __init__(self, cfg: RAFConfig) -> None:
        self.cfg = cfg
        self.scales = parse_scales(cfg.scales)

    @property
    def passes_per_image(self) -> int:
        """Forward + backward passes per training image: the full one plus one per scale."""
        return 1 + len(self.scales)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` followed by its copies at every scale: [(1 + S) B, C, H, W]."""
        return torch.cat([x, *(degrade(x, scale) for scale in self.scales)])

    def loss(self, feature_map: torch.Tensor, embedding: torch.Tensor, y: torch.Tensor,
             classify: Callable[[torch.Tensor], torch.Tensor], dropout: Callable[[torch.Tensor], torch.Tensor],
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The students' loss, given the network's outputs on ``batch(x)``: the first B rows are
        the teacher (detached here), each further block of B rows one student."""
        cfg, size = self.cfg, len(y)
        maps, embeddings = feature_map.split(size), embedding.split(size)
        teacher_map, teacher_embedding = maps[0].detach(), embeddings[0].detach()
        total = torch.zeros((), device=feature_map.device)
        for student_map, student_embedding in zip(maps[1:], embeddings[1:]):
            if cfg.mode == "distill":
                term = cfg.map_weight * map_distance(student_map, teacher_map, cfg.map_loss) + \
                    cfg.embed_weight * embedding_distance(student_embedding, teacher_embedding, cfg.embed_loss,
                                                          cfg.similarity_tau)
            else:
                term = criterion(classify(dropout(student_embedding)), y)
            total = total + term / len(self.scales)
        return total
