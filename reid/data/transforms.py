"""Input pipelines as in the FedReID reference (Resize, Pad, RandomCrop, Flip, ImageNet normalisation)."""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_HEIGHT = 256  # the reference pads by 10 px at 256x128; we scale the pad with the height


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation knobs; the reference's extras (erasing, colour jitter) are off by default."""

    pad: int | None = None  # None: 10 px scaled to the input height
    flip: bool = True
    random_erasing: float = 0.0
    color_jitter: bool = False


def scaled_pad(spec: AugmentSpec, height: int) -> int:
    """The pad in pixels: as configured, or the reference's 10 px at 256 scaled to ``height``."""
    return spec.pad if spec.pad is not None else max(1, round(10 * height / REFERENCE_HEIGHT))


def train_transform(spec: AugmentSpec, height: int, width: int) -> T.Compose:
    """Resize (bicubic), pad, random crop back, flip, normalise; optional jitter and erasing."""
    steps: list = []
    if spec.color_jitter:
        steps.append(T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0))
    pad = scaled_pad(spec, height)
    steps += [
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.Pad(pad),
        T.RandomCrop((height, width)),
    ]
    if spec.flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if spec.random_erasing > 0:
        steps.append(T.RandomErasing(p=spec.random_erasing, value=0))
    return T.Compose(steps)


def test_transform(height: int, width: int) -> T.Compose:
    """Resize (bicubic) and normalise: what feature extraction sees."""
    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
