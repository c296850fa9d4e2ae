"""The tensor input pipeline: decoded-image cache (pixels, reuse, invalidation) and the batched
augmentation (per-sample randomness, seeding, and the same distribution as the PIL path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency

from reid.data import tensor_cache
from reid.data.batch_augment import BatchAugmenter, erase_boxes, normalise
from reid.data.dataset import ImageDataset, load_reid_data
from reid.data.tensor_cache import load_images, training_images
from reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, scaled_pad, train_transform
from reid.data.transforms import test_transform as eval_transform
from reid.divergence import fixed_batch

H, W = 64, 32
CPU = torch.device("cpu")


def _coded_image() -> np.ndarray:
    """Channel 0 = row, channel 1 = column, channel 2 = 255: every output pixel says where it came from
    (padding reads 0 in channel 2)."""
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return np.stack([rows, cols, np.full((H, W), 255)], axis=-1).astype(np.uint8)


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 values (inverse of the ImageNet normalisation)."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return ((normalised * std + mean) * 255).round()


def _offsets_and_flips(outputs: torch.Tensor, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flipped) of each augmented coded image, read from its central pixels."""
    pixels = _pixels(outputs)
    y, x = H // 2, W // 2
    dy = pixels[:, 0, y, x] - y + pad
    flipped = pixels[:, 1, y, x + 1] < pixels[:, 1, y, x]
    dx = torch.where(flipped, pixels[:, 1, y, x] - (W - 1 - x) + pad, pixels[:, 1, y, x] - x + pad)
    return dy.long().numpy(), dx.long().numpy(), flipped.numpy()


def test_every_image_draws_its_own_crop_and_flip_within_the_pad() -> None:
    pad = scaled_pad(AugmentSpec(), H)
    batch = torch.from_numpy(_coded_image()).permute(2, 0, 1).expand(4000, 3, H, W).contiguous()
    out = BatchAugmenter(AugmentSpec(), H)(batch, torch.Generator().manual_seed(0))
    assert out.shape == (4000, 3, H, W) and out.dtype == torch.float32
    dy, dx, flipped = _offsets_and_flips(out, pad)
    assert set(dy.tolist()) == set(range(2 * pad + 1)) and set(dx.tolist()) == set(range(2 * pad + 1))
    assert len(set(zip(dy.tolist(), dx.tolist(), flipped.tolist()))) == 2 * (2 * pad + 1) ** 2  # every combination
    assert abs(flipped.mean() - 0.5) < 0.03
    # the crop is exactly a shifted window of the zero-padded image, flipped or not
    first = _pixels(out[:1])[0].numpy()
    padded = np.pad(_coded_image(), ((pad, pad), (pad, pad), (0, 0))).transpose(2, 0, 1)
    window = padded[:, dy[0]:dy[0] + H, dx[0]:dx[0] + W]
    np.testing.assert_array_equal(first, window[:, :, ::-1] if flipped[0] else window)


def test_offsets_and_flips_follow_the_pil_path_distribution(tmp_path: Path) -> None:
    pad = scaled_pad(AugmentSpec(), H)
    coded = Image.fromarray(_coded_image())
    torch.manual_seed(0)
    pil = train_transform(AugmentSpec(), H, W)  # Resize to the same size leaves the pixels as they are
    reference = torch.stack([pil(coded) for _ in range(1500)])
    batch = torch.from_numpy(_coded_image()).permute(2, 0, 1).expand(1500, 3, H, W).contiguous()
    ours = BatchAugmenter(AugmentSpec(), H)(batch, torch.Generator().manual_seed(1))
    for theirs_values, our_values in zip(_offsets_and_flips(reference, pad), _offsets_and_flips(ours, pad)):
        table = np.array([np.bincount(theirs_values.astype(int), minlength=2 * pad + 1),
                          np.bincount(our_values.astype(int), minlength=2 * pad + 1)])
        table = table[:, table.sum(axis=0) > 0]
        assert chi2_contingency(table).pvalue > 0.001, table  # the same distribution
    np.testing.assert_allclose(reference.mean().item(), ours.mean().item(), atol=0.02)  # the same normalisation


def test_without_augmentation_the_batch_is_the_test_transform(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site)
    paths = [s.path for s in data.query[:6]]
    decoded = load_images(paths, H, W)
    pil = torch.stack([ImageDataset(data.query[:6], eval_transform(H, W))[i][0] for i in range(6)])
    torch.testing.assert_close(normalise(decoded), pil, atol=1e-6, rtol=0)
    plain = BatchAugmenter(AugmentSpec(pad=0, flip=False), H)(decoded, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, pil, atol=1e-6, rtol=0)
    images = training_images(data, H, W)
    probe, labels = fixed_batch(images, 8, seed=3)
    assert probe.shape == (8, 3, H, W) and labels.dtype == torch.long
    torch.testing.assert_close(probe, fixed_batch(images, 8, seed=3)[0])


def test_the_same_seed_gives_the_same_batch_and_another_seed_another() -> None:
    spec = AugmentSpec(random_erasing=0.5, color_jitter=True)
    batch = torch.from_numpy(_coded_image()).permute(2, 0, 1).expand(64, 3, H, W).contiguous()
    augment = BatchAugmenter(spec, H)
    first = augment(batch, torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, augment(batch, torch.Generator().manual_seed(7)), atol=0, rtol=0)
    assert not torch.equal(first, augment(batch, torch.Generator().manual_seed(8)))
    assert len({tuple(image.flatten()[::97].tolist()) for image in first}) == 64  # per image, not per batch


def test_random_erasing_boxes_match_torchvision_bounds() -> None:
    boxes = erase_boxes(4000, H, W, p=0.5, generator=torch.Generator().manual_seed(0), device=CPU)
    area = boxes.flatten(1).sum(dim=1).float() / (H * W)
    erased = area > 0
    assert abs(erased.float().mean().item() - 0.5) < 0.03
    assert area[erased].min() >= 0.015 and area[erased].max() <= 0.35  # 2-33 % of the image, up to rounding
    rows = boxes.any(dim=3).squeeze(1)[erased]  # every box is one solid rectangle
    cols = boxes.any(dim=2).squeeze(1)[erased]
    assert torch.equal(rows.sum(1) * cols.sum(1), boxes.flatten(1).sum(1)[erased])


def test_colour_jitter_changes_each_image_by_its_own_small_factor() -> None:
    grey = torch.full((256, 3, H, W), 128, dtype=torch.uint8)
    out = BatchAugmenter(AugmentSpec(pad=0, flip=False, color_jitter=True), H)(grey, torch.Generator().manual_seed(0))
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    means = ((out * std + mean) * 255).mean(dim=(1, 2, 3))
    assert len(set(means.tolist())) == 256  # one factor per image
    assert means.min() >= 128 * 0.9 - 1 and means.max() <= 128 * 1.1 + 1


def test_decoded_images_are_cached_on_disk_and_reused(tiny_site: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"  # a copy: this test rewrites a file's mtime, and the fixture is shared
    shutil.copytree(tiny_site, site)
    data = load_reid_data(site)
    paths = [s.path for s in data.train]
    decodes = []
    real_decode = tensor_cache.decode_images
    monkeypatch.setattr(tensor_cache, "decode_images", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(tensor_cache, "_IN_PROCESS", tensor_cache.OrderedDict())
    cache = tmp_path / "image-cache"

    first = load_images(paths, H, W, cache)
    assert len(decodes) == 1 and len(list(cache.glob("images-*.pt"))) == 1
    assert load_images(paths, H, W, cache) is first  # same process: the memo
    tensor_cache._IN_PROCESS.clear()  # a fresh ClientApp process: read from disk, no decoding
    torch.testing.assert_close(load_images(paths, H, W, cache), first, atol=0, rtol=0)
    assert len(decodes) == 1

    tensor_cache._IN_PROCESS.clear()
    os.utime(paths[0], ns=(1, 1))  # a rewritten image: the key changes, decode again
    load_images(paths, H, W, cache)
    assert len(decodes) == 2 and len(list(cache.glob("images-*.pt"))) == 2

    tensor_cache._IN_PROCESS.clear()
    for file in cache.glob("images-*.pt"):  # a torn cache file is decoded again, not trusted
        file.write_bytes(b"torn")
    torch.testing.assert_close(load_images(paths, H, W, cache), first, atol=0, rtol=0)
    assert len(decodes) == 3
