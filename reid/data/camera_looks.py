"""What a real camera does to colour and light beyond a gain per channel, for the synthetic sites of
the domain-generalisation benchmark (``synthetic-fedreid9``).

A per-channel gain and offset is exactly what the first BatchNorm layer of a network normalises
away in train mode, so a benchmark whose cameras differ only by that cannot show what a
domain-generalisation method is worth. Each camera here also has:

* a colour / white-balance matrix with cross-talk between channels (a 3x3 mix, not a diagonal):
  it changes how the channels co-vary, which no per-channel normalisation undoes;
* a tone curve per channel (a gamma and an S-shaped contrast): non-linear in the pixel value;
* vignetting and, on some cameras, a cast shadow across the scene: the light changes across the
  image, not uniformly;
* sensor noise that grows with the signal (shot noise), on top of the fixed noise every camera had.

Every camera of every site draws its look from the one distribution below (``draw_look``), so
training sites and in-distribution held-out sites share it. The draws come from a random stream
of their own, so adding the looks moved no other property of a camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CameraLook:
    """One camera's colour, tone, light fall-off and noise."""

    colour_matrix: tuple[tuple[float, float, float], ...]  # 3x3, rows = output channels
    gammas: tuple[float, float, float]
    contrast: tuple[float, float, float]  # S-curve strength per channel, |c| < 1 keeps it monotone
    vignette: float  # brightness lost at the corners
    shadow: tuple[float, float, float] | None  # (angle, offset, darkness) of a cast shadow, or none
    shot_noise: float  # noise standard deviation at full brightness (scales with sqrt of the value)

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``pixels``: HxWx3 float32 in [0, 1] -> the same seen through this camera."""
        height, width = pixels.shape[:2]
        out = pixels @ np.asarray(self.colour_matrix, np.float32).T
        out = np.clip(out, 0.0, 1.0) ** np.asarray(self.gammas, np.float32)
        contrast = np.asarray(self.contrast, np.float32)
        out = out - contrast * np.sin(2 * np.pi * out) / (2 * np.pi)
        rows = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
        cols = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
        light = 1.0 - self.vignette * (rows ** 2 + cols ** 2) / 2
        if self.shadow is not None:
            angle, offset, darkness = self.shadow
            side = np.cos(angle) * cols + np.sin(angle) * rows - offset
            light = light * (1.0 - (1.0 - darkness) / (1.0 + np.exp(-12.0 * side)))  # soft edge
        out = out * light[:, :, None]
        noise = rng.normal(0.0, 1.0, out.shape).astype(np.float32) * self.shot_noise * np.sqrt(np.clip(out, 0, 1))
        return np.clip(out + noise, 0.0, 1.0)


def draw_look(rng: np.random.Generator) -> CameraLook:
    """One camera's look from the benchmark's distribution of looks."""
    white_balance = np.exp(rng.normal(0.0, 0.12, 3))
    mix = np.eye(3) + rng.normal(0.0, 0.09, (3, 3)) * (1 - np.eye(3))
    mix = mix / mix.sum(axis=1, keepdims=True)  # a grey stays grey before white balance
    matrix = white_balance[:, None] * mix
    shadow = None
    if rng.random() < 0.5:
        shadow = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(-0.6, 0.6)), float(rng.uniform(0.5, 0.85)))
    return CameraLook(
        colour_matrix=tuple(tuple(float(v) for v in row) for row in matrix),
        gammas=tuple(float(g) for g in np.exp(rng.normal(0.0, 0.18, 3))),  # type: ignore[arg-type]
        contrast=tuple(float(c) for c in rng.uniform(-0.6, 0.6, 3)),  # type: ignore[arg-type]
        vignette=float(rng.uniform(0.0, 0.5)),
        shadow=shadow,
        shot_noise=float(rng.uniform(0.0, 0.06)),
    )
