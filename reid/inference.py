"""Use a trained model on a site's own images: preprocess, embed, rank (``fedreid.load_model``).

Every step is the evaluation's own: images are decoded and resized exactly as the federation's
evaluation decodes them (reid/data/tensor_cache.py), normalised the same way, and embedded with
the flip-sum and L2 of reid/features.py, so a ranking here is the ranking the federation measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from reid.data.batch_augment import normalise
from reid.data.layout import IMAGE_SUFFIXES
from reid.data.tensor_cache import decode_image, decode_images, load_images, resize_picture
from reid.device import pick_device
from reid.features import adapt_batchnorm, cosine_distance, extract_features
from reid.models import ReIDNet
from reid.saved_model import ModelInfo, build_saved_model

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, torch.Tensor, np.ndarray, Sequence[Union[str, Path, Image.Image]]]


def image_files(source: str | Path) -> list[Path]:
    """One image file, or every image in a folder (sorted, not recursive)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an image file nor a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


@dataclass(frozen=True)
class Ranking:
    """For each query (row), the ``top_k`` nearest gallery items: indices and cosine distances."""

    indices: np.ndarray  # [Q, k] int64, nearest first
    distances: np.ndarray  # [Q, k] float32


class ReIDModel:
    """A loaded model and the device it runs on (the first GPU when there is one)."""

    def __init__(self, net: ReIDNet, info: ModelInfo, device: torch.device | None = None,
                 batch_size: int | None = None) -> None:
        self.net, self.info = net, info
        self.device = device or pick_device(None)
        self.batch_size = batch_size or info.eval_batch_size
        self.batchnorm_adapted_on = 0  # images the BatchNorm statistics were recomputed on (0: not done)
        self.net.to(self.device).eval()

    @property
    def needs_batchnorm(self) -> bool:
        """True while this model lacks BatchNorm statistics (a global model of a ``bn_stats=local`` run)."""
        return self.info.needs_batchnorm and not self.batchnorm_adapted_on

    @property
    def size(self) -> tuple[int, int]:
        return self.info.spec.height, self.info.spec.width

    def load_uint8(self, images: ImageInput) -> torch.Tensor:
        """Images as the evaluation holds them: uint8 [B, 3, H, W] at the model's input size."""
        height, width = self.size
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images.unsqueeze(0)
            if batch.dtype != torch.uint8:
                raise TypeError(f"a tensor of images must be uint8 [B, 3, H, W] (got {batch.dtype}); "
                                f"a float batch from .preprocess goes straight to .embed")
            if batch.shape[1] != 3:
                raise ValueError(f"images must be [B, 3, H, W], got {list(batch.shape)}")
            if tuple(batch.shape[2:]) != (height, width):
                pictures = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in batch]
                return self.load_uint8(pictures)
            return batch
        if isinstance(images, (str, Path)):
            return load_images(image_files(images), height, width)
        if isinstance(images, Image.Image):
            images = [images]
        items = list(images)
        if all(isinstance(item, (str, Path)) for item in items):
            return decode_images([Path(item).expanduser() for item in items], height, width)
        out = torch.empty((len(items), 3, height, width), dtype=torch.uint8)
        for index, item in enumerate(items):
            pixels = (resize_picture(item, height, width) if isinstance(item, Image.Image)
                      else decode_image(Path(item).expanduser(), height, width))
            out[index] = torch.from_numpy(pixels).permute(2, 0, 1)
        return out

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """File paths, a folder, PIL images or a uint8 tensor -> the float32 [B, 3, H, W] batch the
        network takes (resized and ImageNet-normalised as in evaluation), on the CPU."""
        return normalise(self.load_uint8(images))

    def _warn_batchnorm(self) -> None:
        if self.needs_batchnorm:
            log.warning("this model's BatchNorm statistics stayed on the sites (bn_stats=local); call "
                        ".adapt_batchnorm(images of your cameras) first, or its features are poor")

    @torch.no_grad()
    def embed(self, images: ImageInput, flip: bool = True) -> np.ndarray:
        """L2-normalised embeddings [B, D] float32: feature(image) + feature(flipped image) as in
        evaluation; ``flip=False``: one pass (what an exported model computes)."""
        self._warn_batchnorm()
        if isinstance(images, torch.Tensor) and images.is_floating_point():  # from .preprocess
            batch = images
        else:
            batch = self.load_uint8(images)
        return extract_features(self.net, batch, self.device, self.batch_size, flip=flip)

    def rank(self, query: ImageInput | np.ndarray, gallery: ImageInput | np.ndarray, top_k: int = 10) -> Ranking:
        """The ``top_k`` gallery items nearest each query by cosine distance; embeddings (float
        [N, D] arrays from ``.embed``) or anything ``.embed`` takes."""
        q = query if _is_embedding(query) else self.embed(query)
        g = gallery if _is_embedding(gallery) else self.embed(gallery)
        distances = cosine_distance(np.asarray(q, np.float32), np.asarray(g, np.float32))
        k = min(top_k, distances.shape[1])
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return Ranking(indices=order, distances=np.take_along_axis(distances, order, axis=1))

    def adapt_batchnorm(self, images: ImageInput) -> int:
        """Recompute the BatchNorm statistics on these (unaugmented) images of the target cameras,
        as a site does with a model whose statistics stayed elsewhere; returns how many it used."""
        uint8 = self.load_uint8(images)
        if len(uint8) < 2:
            raise ValueError("BatchNorm statistics need at least two images")
        adapt_batchnorm(self.net, uint8, self.device)
        self.batchnorm_adapted_on = len(uint8)
        return len(uint8)


def _is_embedding(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind == "f"


def load_model(path: str | Path, device: str | torch.device | None = None,
               backbone_modules: Sequence[str] = ()) -> ReIDModel:
    """A model file (``model.pt`` of a run, or a site's model) ready to embed and rank. The file runs
    no code: a ``backbone_factory`` it names is used only when its module is in ``backbone_modules``."""
    net, info = build_saved_model(path, frozenset(backbone_modules))
    chosen = torch.device(device) if isinstance(device, str) else device
    return ReIDModel(net, info, chosen)
