"""Seeded synthetic camera sites in the Market-1501 layout, so demos and tests need no download.

Why it is not trivial: identities are drawn from overlapping palettes (many people wear dark
trousers), each camera changes illumination, colour cast, blur, resolution, scale, background and
the direction people walk past it, and every site has its own fashion, lighting and size. A
model must learn colour-constant, view-tolerant cues to match people across cameras, which keeps a
small CNN well below 100% Rank-1 while training clearly beats an untrained network.

Every random choice comes from a generator keyed by (seed, site, identity, camera, image), so the
output is byte-for-byte deterministic and independent of generation order.

Resolution drift (``synthetic-resdrift``): a site may carry a ``ResolutionProfile`` that fixes how
its cameras capture: per camera, a factor by which each 128x64 box is shrunk and blown up again
(4 = a 32x16 capture), plus its blur. Its four sites are sharp-only, low-resolution-only, mixed
(sharp and low-resolution cameras) and medium.
"""

from __future__ import annotations

import colorsys
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reid.data.camera_looks import CameraLook, draw_look

log = logging.getLogger(__name__)

OUT_HEIGHT, OUT_WIDTH = 128, 64
_CANVAS_H, _CANVAS_W = 2 * OUT_HEIGHT, 2 * OUT_WIDTH  # drawn at 2x, downsampled for soft edges
_PIDS_PER_SITE = 1000  # site k owns pids k*1000+1 ...: identities are disjoint across sites
MAX_QUERIES_PER_IDENTITY = 2  # synthetic-fedreid9: query images per test identity (one per camera)

SKIN_TONES = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 30)]
HAIR_COLOURS = [(20, 17, 15), (50, 35, 25), (90, 60, 35), (180, 150, 90), (150, 150, 150), (140, 60, 30)]
PATTERNS = ("solid", "solid", "hstripes", "vstripes", "checker", "split", "logo")
BOTTOM_TYPES = ("trousers", "trousers", "trousers", "shorts", "skirt")
COMMON_BOTTOMS = [(30, 30, 35), (40, 50, 90), (70, 80, 110), (110, 110, 115), (150, 130, 95), (20, 20, 20)]
COMMON_TOPS = [(25, 25, 28), (230, 230, 230), (120, 120, 125), (35, 40, 70), (90, 30, 35)]
LOOKALIKE_CHANGES = ("top", "bottom", "bag", "hair_style", "pattern", "shoes", "top_second", "long_sleeves")
VIEWS = ("front", "back", "side")


@dataclass(frozen=True)
class ResolutionProfile:
    """How a site's cameras capture: camera c shrinks every box by ``factors[c % len(factors)]``
    (then blows it back up to 128x64, bilinear) and blurs it with a radius drawn from ``blur``."""

    name: str
    factors: tuple[float, ...]
    blur: tuple[float, float]

    def capture_size(self, camera: int) -> tuple[int, int]:
        """(height, width) the camera really captures."""
        factor = self.factors[camera % len(self.factors)]
        return int(OUT_HEIGHT / factor), int(OUT_WIDTH / factor)


@dataclass(frozen=True)
class SiteStyle:
    """What makes one camera site look unlike the others."""

    name: str
    num_train_ids: int
    num_test_ids: int
    num_cameras: int
    fashion_hue: float  # centre of the site's favourite clothing hue, in [0, 1)
    fashion_share: float  # share of garments drawn near that hue
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    gain: tuple[float, float]  # illumination range over cameras
    cast: float  # strength of per-camera colour casts
    blur: tuple[float, float]
    scale: tuple[float, float]  # person height as a fraction of the box
    images_per_camera: tuple[int, int] = (2, 4)
    lookalike_share: float = 0.4  # share of people who dress like an earlier person, bar one or two items
    num_distractors: int = 10
    num_junk: int = 4
    infrared: bool = False  # night-time infrared cameras: grey images, colour cues gone
    resolution: ResolutionProfile | None = None  # None: each camera draws its own mild resolution loss
    # Set by synthetic-fedreid9 (reid/data/fedreid9.py): mean images per identity, spread over the
    # cameras that see it, exactly ids x this in total; None: images_per_camera per seen camera.
    images_per_identity: float | None = None
    camera_views: tuple[tuple[float, float, float], ...] = ()  # per camera (front, back, side); () = drawn
    occlusion: float = 0.12  # share of boxes a pole or a passer-by partly hides
    camera_looks: bool = False  # colour matrices, tone curves, vignetting, shadows, shot noise (camera_looks.py)


DEFAULT_STYLES = (
    SiteStyle("mall", 48, 64, 4, 0.02, 0.45, (205, 195, 180), (150, 140, 130), (0.85, 1.25), 0.12, (0.0, 0.8), (0.78, 0.94)),
    SiteStyle("station", 32, 48, 3, 0.08, 0.50, (125, 120, 112), (80, 78, 75), (0.70, 1.00), 0.15, (0.2, 1.0), (0.70, 0.90)),
    SiteStyle("campus", 20, 40, 3, 0.30, 0.45, (120, 150, 110), (125, 120, 105), (0.90, 1.35), 0.10, (0.0, 0.9), (0.74, 0.92)),
    SiteStyle("airport", 40, 20, 5, 0.80, 0.40, (225, 225, 230), (180, 180, 185), (0.95, 1.30), 0.08, (0.0, 0.6), (0.80, 0.95)),
    SiteStyle("street", 28, 14, 4, 0.12, 0.50, (140, 125, 115), (85, 85, 90), (0.60, 1.20), 0.22, (0.4, 1.5), (0.68, 0.88)),
)


RESOLUTION_PROFILES = (
    ResolutionProfile("sharp", (1.0,), (0.0, 0.3)),  # 128x64 cameras only
    ResolutionProfile("lowres", (4.0,), (0.5, 1.0)),  # 32x16 cameras only, blown up and blurred
    ResolutionProfile("mixed", (1.0, 4.0), (0.0, 0.6)),  # sharp and low-resolution cameras
    ResolutionProfile("medium", (2.0,), (0.3, 0.7)),  # 64x32 cameras
)
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _garment_colour(rng: np.random.Generator, style: SiteStyle) -> tuple[int, int, int]:
    hue = style.fashion_hue + rng.normal(0, 0.05) if rng.random() < style.fashion_share else rng.random()
    return _hsv(hue, rng.uniform(0.25, 0.95), rng.uniform(0.25, 0.95))


@dataclass(frozen=True)
class Identity:
    """Appearance that stays fixed for one person across all cameras."""

    height: float
    build: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    top: tuple[int, int, int]
    top_second: tuple[int, int, int]
    pattern: str
    long_sleeves: bool
    bottom: tuple[int, int, int]
    bottom_type: str
    shoes: tuple[int, int, int]
    bag: str
    bag_colour: tuple[int, int, int]


def _top_colour(rng: np.random.Generator, style: SiteStyle) -> tuple[int, int, int]:
    return COMMON_TOPS[rng.integers(len(COMMON_TOPS))] if rng.random() < 0.3 else _garment_colour(rng, style)


def make_identity(rng: np.random.Generator, style: SiteStyle) -> Identity:
    """Draw one person's clothing, build and accessories."""
    bottom = COMMON_BOTTOMS[rng.integers(len(COMMON_BOTTOMS))] if rng.random() < 0.6 else _garment_colour(rng, style)
    shoes = [(25, 25, 25), (235, 235, 235), _garment_colour(rng, style)][rng.integers(3)]
    return Identity(
        height=rng.uniform(0.86, 1.0),
        build=rng.uniform(0.8, 1.2),
        skin=SKIN_TONES[rng.integers(len(SKIN_TONES))],
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))],
        hair_style=["short", "long", "cap", "bald"][rng.choice(4, p=[0.45, 0.3, 0.15, 0.1])],
        top=_top_colour(rng, style),
        top_second=_top_colour(rng, style),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        long_sleeves=bool(rng.random() < 0.5),
        bottom=bottom,
        bottom_type=BOTTOM_TYPES[rng.integers(len(BOTTOM_TYPES))],
        shoes=shoes,
        bag=["none", "none", "backpack", "shoulder"][rng.integers(4)],
        bag_colour=_garment_colour(rng, style),
    )


def make_lookalike(rng: np.random.Generator, base: Identity, style: SiteStyle) -> Identity:
    """A different person dressed almost like ``base``: one or two items differ, build varies a little.

    Real crowds are full of near-identical outfits; these force a model past the dominant colours.
    """
    other = make_identity(rng, style)
    changes = rng.choice(len(LOOKALIKE_CHANGES), size=int(rng.integers(1, 3)), replace=False)
    fields = {LOOKALIKE_CHANGES[i]: getattr(other, LOOKALIKE_CHANGES[i]) for i in changes}
    fields["height"] = float(np.clip(base.height + rng.normal(0, 0.03), 0.84, 1.0))
    fields["build"] = float(np.clip(base.build + rng.normal(0, 0.08), 0.75, 1.25))
    return replace(base, **fields)


@dataclass(frozen=True)
class Camera:
    """How one camera sees the world: light, colour, optics, placement."""

    gain: float
    cast: tuple[float, float, float]
    gamma: float
    blur: float
    noise: float
    scale: float
    low_res: float
    jpeg_quality: int
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    horizon: float
    tiles: int
    view_probs: tuple[float, float, float]
    light_slope: float
    infrared: bool = False
    occlusion: float = 0.12
    look: CameraLook | None = None  # colour, tone, light fall-off and noise beyond the gain (camera_looks.py)


def make_camera(rng: np.random.Generator, style: SiteStyle, index: int = 0) -> Camera:
    """Draw one camera of a site: site-typical but each camera visibly different; a site with a
    resolution profile fixes camera ``index``'s capture size and blur (the draws stay the same, so
    the other properties do not move)."""
    def jitter(colour: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)  # type: ignore[return-value]

    views = rng.dirichlet([1.2, 1.2, 1.0])
    camera = Camera(
        gain=rng.uniform(*style.gain),
        cast=tuple(float(x) for x in np.clip(1 + rng.normal(0, style.cast, 3), 0.6, 1.4)),  # type: ignore[arg-type]
        gamma=rng.uniform(0.8, 1.25),
        blur=rng.uniform(*style.blur),
        noise=rng.uniform(0.0, 0.04),
        scale=rng.uniform(*style.scale),
        low_res=float(rng.choice([1.0, 1.0, 1.5, 2.0])),
        jpeg_quality=int(rng.integers(70, 96)),
        wall=jitter(style.wall, 30),
        floor=jitter(style.floor, 25),
        horizon=rng.uniform(0.55, 0.8),
        tiles=int(rng.integers(0, 4)),
        view_probs=tuple(float(v) for v in views),  # type: ignore[arg-type]
        light_slope=rng.uniform(-0.25, 0.25),
        infrared=style.infrared,
        occlusion=style.occlusion,
    )
    if style.camera_views:  # a site whose cameras see people from set angles (VIPeR, CUHK01)
        camera = replace(camera, view_probs=style.camera_views[index % len(style.camera_views)])
    profile = style.resolution
    if profile is None:
        return camera
    return replace(camera, low_res=profile.factors[index % len(profile.factors)], blur=rng.uniform(*profile.blur))


def _draw_background(rng: np.random.Generator, cam: Camera) -> Image.Image:
    image = Image.new("RGB", (_CANVAS_W, _CANVAS_H), cam.wall)
    draw = ImageDraw.Draw(image)
    horizon = int(cam.horizon * _CANVAS_H) + int(rng.integers(-8, 9))
    draw.rectangle([0, horizon, _CANVAS_W, _CANVAS_H], fill=cam.floor)
    if cam.tiles:
        step = 12 + 8 * cam.tiles
        darker = tuple(max(0, c - 25) for c in cam.floor)
        offset = int(rng.integers(step))
        for y in range(horizon + offset % step, _CANVAS_H, step):
            draw.line([0, y, _CANVAS_W, y], fill=darker, width=2)
    for _ in range(int(rng.integers(1, 4))):  # clutter: doors, signs, other objects
        x0, y0 = int(rng.integers(-20, _CANVAS_W)), int(rng.integers(0, horizon))
        w, h = int(rng.integers(10, 60)), int(rng.integers(10, 90))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def _pattern_layer(person: Identity, box: tuple[int, int, int, int], view: str) -> Image.Image:
    x0, y0, x1, y1 = box
    layer = Image.new("RGB", (_CANVAS_W, _CANVAS_H), person.top)
    draw = ImageDraw.Draw(layer)
    band = max(3, (y1 - y0) // 6)
    if person.pattern == "hstripes":
        for y in range(y0, y1, 2 * band):
            draw.rectangle([0, y, _CANVAS_W, y + band - 1], fill=person.top_second)
    elif person.pattern == "vstripes":
        for x in range(x0, x1, 2 * band // 2 + 2):
            draw.rectangle([x, 0, x + band // 2, _CANVAS_H], fill=person.top_second)
    elif person.pattern == "checker":
        for y in range(y0, y1, band):
            for x in range(x0, x1, band):
                if ((x - x0) // band + (y - y0) // band) % 2:
                    draw.rectangle([x, y, x + band - 1, y + band - 1], fill=person.top_second)
    elif person.pattern == "split":
        mid = (x0 + x1) // 2
        draw.rectangle([mid, 0, _CANVAS_W, _CANVAS_H], fill=person.top_second)
    elif person.pattern == "logo" and view == "front":
        cx, cy, r = (x0 + x1) // 2, y0 + (y1 - y0) // 3, max(4, (x1 - x0) // 5)
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=person.top_second)
    return layer


def _draw_person(image: Image.Image, rng: np.random.Generator, person: Identity, cam: Camera, view: str) -> None:
    draw = ImageDraw.Draw(image)
    hp = cam.scale * _CANVAS_H * person.height * rng.uniform(0.96, 1.04)
    bottom = _CANVAS_H * rng.uniform(0.96, 0.995)
    top = bottom - hp
    cx = _CANVAS_W / 2 + rng.normal(0, 4)
    width_factor = person.build * (0.62 if view == "side" else 1.0)
    phase = rng.uniform(-1, 1)

    def y(frac: float) -> float:
        return top + frac * hp

    half_torso = 0.15 * hp * width_factor
    leg_w = 0.085 * hp * person.build
    # backpack behind the body when seen from the side
    if person.bag == "backpack" and view == "side":
        draw.rectangle([cx - half_torso - 0.12 * hp, y(0.2), cx - half_torso + 4, y(0.46)], fill=person.bag_colour)
    # legs: trousers, shorts (skin below the knee) or skirt over skin legs
    spread = 0.06 * hp * phase
    for side in (-1, 1):
        hip_x = cx + side * leg_w * 0.6
        foot_x = hip_x + side * spread
        leg_colour = person.bottom if person.bottom_type == "trousers" else person.skin
        draw.polygon([(hip_x - leg_w / 2, y(0.5)), (hip_x + leg_w / 2, y(0.5)),
                      (foot_x + leg_w / 2, y(0.95)), (foot_x - leg_w / 2, y(0.95))], fill=leg_colour)
        if person.bottom_type == "shorts":
            draw.rectangle([hip_x - leg_w / 2 - 1, y(0.5), hip_x + leg_w / 2 + 1, y(0.68)], fill=person.bottom)
        draw.rectangle([foot_x - leg_w / 2 - 2, y(0.95), foot_x + leg_w / 2 + 3, y(1.0)], fill=person.shoes)
    if person.bottom_type == "skirt":
        draw.polygon([(cx - half_torso, y(0.48)), (cx + half_torso, y(0.48)),
                      (cx + half_torso * 1.3, y(0.72)), (cx - half_torso * 1.3, y(0.72))], fill=person.bottom)
    # arms swing opposite to the legs
    arm_w = 0.065 * hp * person.build
    for side in (-1, 1):
        if view == "side" and side == 1:
            continue
        ax = cx + side * (half_torso + arm_w / 2)
        swing = -side * phase * 0.04 * hp if view != "side" else phase * 0.08 * hp
        sleeve_end = 0.5 if person.long_sleeves else 0.28
        draw.polygon([(ax - arm_w / 2, y(0.17)), (ax + arm_w / 2, y(0.17)),
                      (ax + arm_w / 2 + swing, y(0.5)), (ax - arm_w / 2 + swing, y(0.5))], fill=person.skin)
        draw.polygon([(ax - arm_w / 2, y(0.17)), (ax + arm_w / 2, y(0.17)),
                      (ax + arm_w / 2 + swing * sleeve_end / 0.5, y(sleeve_end)),
                      (ax - arm_w / 2 + swing * sleeve_end / 0.5, y(sleeve_end))], fill=person.top)
    # torso with its pattern, pasted through a mask
    torso_box = (int(cx - half_torso), int(y(0.16)), int(cx + half_torso), int(y(0.52)))
    mask = Image.new("L", (_CANVAS_W, _CANVAS_H), 0)
    ImageDraw.Draw(mask).polygon([(torso_box[0], torso_box[1]), (torso_box[2], torso_box[1]),
                                  (torso_box[2] - 2, torso_box[3]), (torso_box[0] + 2, torso_box[3])], fill=255)
    image.paste(_pattern_layer(person, torso_box, view), (0, 0), mask)
    draw = ImageDraw.Draw(image)
    if person.bag == "backpack" and view == "back":
        draw.rectangle([cx - half_torso * 0.75, y(0.19), cx + half_torso * 0.75, y(0.45)], fill=person.bag_colour)
    elif person.bag == "backpack" and view == "front":
        for side in (-1, 1):
            draw.line([cx + side * half_torso * 0.6, y(0.16), cx + side * half_torso * 0.5, y(0.4)],
                      fill=person.bag_colour, width=3)
    elif person.bag == "shoulder":
        side = 1 if view != "back" else -1
        draw.line([cx - side * half_torso, y(0.17), cx + side * half_torso, y(0.45)], fill=person.bag_colour, width=3)
        bag_x = sorted([cx + side * (half_torso - 6), cx + side * (half_torso + 0.1 * hp)])
        draw.rectangle([bag_x[0], y(0.42), bag_x[1], y(0.55)], fill=person.bag_colour)
    # head and hair
    r = 0.075 * hp
    hx, hy = cx, y(0.085)
    face = person.hair if (view == "back" and person.hair_style not in ("bald", "cap")) else person.skin
    draw.ellipse([hx - r, hy - r, hx + r, hy + r * 1.1], fill=face)
    if person.hair_style in ("short", "long"):
        draw.chord([hx - r, hy - r * 1.1, hx + r, hy + r * 0.6], 180, 360, fill=person.hair)
        if person.hair_style == "long":
            draw.rectangle([hx - r, hy, hx + r, y(0.24)], fill=person.hair)
            if view != "back":
                draw.ellipse([hx - r * 0.7, hy - r * 0.6, hx + r * 0.7, hy + r], fill=person.skin)
    elif person.hair_style == "cap":
        draw.chord([hx - r * 1.05, hy - r * 1.2, hx + r * 1.05, hy + r * 0.3], 180, 360, fill=person.top_second)


def _occlude(image: Image.Image, rng: np.random.Generator, share: float = 0.12) -> None:
    """Sometimes a pole or a passer-by hides part of the person, as in real crowded scenes."""
    if rng.random() < share:
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x = int(rng.integers(0, _CANVAS_W))
            draw.rectangle([x, 0, x + int(rng.integers(8, 24)), _CANVAS_H], fill=colour)
        else:
            draw.rectangle([0, int(_CANVAS_H * rng.uniform(0.65, 0.85)), _CANVAS_W, _CANVAS_H], fill=colour)


def _apply_camera(image: Image.Image, rng: np.random.Generator, cam: Camera) -> Image.Image:
    image = image.resize((OUT_WIDTH, OUT_HEIGHT), Image.LANCZOS)
    if cam.low_res > 1:
        small = (int(OUT_WIDTH / cam.low_res), int(OUT_HEIGHT / cam.low_res))
        image = image.resize(small, Image.BILINEAR).resize((OUT_WIDTH, OUT_HEIGHT), Image.BILINEAR)
    if cam.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(cam.blur))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    ramp = 1 + cam.light_slope * np.linspace(-1, 1, OUT_WIDTH, dtype=np.float32)[None, :, None]
    gain = cam.gain * rng.uniform(0.92, 1.08)
    pixels = np.clip(pixels * gain * np.asarray(cam.cast, np.float32) * ramp, 0, 1) ** cam.gamma
    if cam.look is not None:
        pixels = cam.look.apply(pixels, rng)
    if cam.infrared:
        pixels = np.repeat(pixels @ np.array([[0.299], [0.587], [0.114]], np.float32), 3, axis=2)
    pixels = pixels + rng.normal(0, cam.noise, pixels.shape).astype(np.float32)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def render(person: Identity | None, cam: Camera, rng: np.random.Generator, partial: bool = False) -> Image.Image:
    """One detection box: background, person seen from a camera-biased view, occlusion, camera effects."""
    image = _draw_background(rng, cam)
    if person is not None:
        view = VIEWS[rng.choice(3, p=cam.view_probs)]
        _draw_person(image, rng, person, cam, view)
        if partial:  # a bad detection: only a slice of the person
            top = int(rng.integers(0, _CANVAS_H // 2))
            image = image.crop((0, top, _CANVAS_W, top + _CANVAS_H // 2)).resize((_CANVAS_W, _CANVAS_H))
        else:
            _occlude(image, rng, cam.occlusion)
    return _apply_camera(image, rng, cam)


@dataclass
class SiteSummary:
    """Counts of what was written for one site."""

    name: str
    root: Path
    counts: dict[str, int] = field(default_factory=dict)


def style_for(index: int, seed: int) -> SiteStyle:
    """The default styles first; beyond them, seeded variations with their own size and look."""
    if index < len(DEFAULT_STYLES):
        return DEFAULT_STYLES[index]
    base = DEFAULT_STYLES[index % len(DEFAULT_STYLES)]
    rng = _rng(seed, index, 7)
    return SiteStyle(
        name=f"{base.name}{index // len(DEFAULT_STYLES) + 1}",
        num_train_ids=int(rng.integers(16, 48)),
        num_test_ids=int(rng.integers(10, 24)),
        num_cameras=int(rng.integers(2, 6)),
        fashion_hue=float(rng.random()),
        fashion_share=base.fashion_share,
        wall=tuple(int(c) for c in rng.integers(60, 230, 3)),  # type: ignore[arg-type]
        floor=tuple(int(c) for c in rng.integers(50, 200, 3)),  # type: ignore[arg-type]
        gain=base.gain,
        cast=base.cast,
        blur=base.blur,
        scale=base.scale,
    )


def _sightings_per_camera(id_rng: np.random.Generator, style: SiteStyle) -> list[tuple[int, int]]:
    """(camera, images, gives a query) for one identity: a random set of at least two cameras, each
    seeing the person ``images_per_camera`` times; a test identity's first image per camera is a query."""
    seen = sorted(id_rng.choice(style.num_cameras, size=int(id_rng.integers(2, style.num_cameras + 1)), replace=False))
    return [(int(c), int(id_rng.integers(style.images_per_camera[0], style.images_per_camera[1] + 1)), True)
            for c in seen]


def images_per_identity(style: SiteStyle, seed: int, site_index: int) -> list[int]:
    """How many images each identity of the site gets: ``images_per_identity`` on average, exactly
    round(ids x it) per split (train, test), at least two each (two cameras must see everyone)."""
    assert style.images_per_identity is not None
    rng = _rng(seed, site_index, 6)
    totals: list[int] = []
    for count in (style.num_train_ids, style.num_test_ids):
        target = max(2 * count, round(count * style.images_per_identity))
        base = max(2, target // count)
        extra = np.zeros(count, dtype=int)
        extra[rng.permutation(count)[: target - base * count]] = 1
        totals += [base + int(e) for e in extra]
    return totals


def _sightings_of(id_rng: np.random.Generator, style: SiteStyle, total: int) -> list[tuple[int, int, bool]]:
    """(camera, images, gives a query) for one identity with ``total`` images over at least two cameras, and the
    camera whose images all go to the gallery when it is a test identity (up to two other cameras
    give one query each), so that every query has a match from another camera."""
    seen_count = min(style.num_cameras, total, int(id_rng.integers(2, style.num_cameras + 1)))
    seen = sorted(int(c) for c in id_rng.choice(style.num_cameras, size=seen_count, replace=False))
    counts = np.ones(seen_count, dtype=int)
    np.add.at(counts, id_rng.integers(0, seen_count, size=total - seen_count), 1)
    gallery_only = int(id_rng.integers(seen_count))
    query_cameras = [c for i, c in enumerate(seen) if i != gallery_only][:MAX_QUERIES_PER_IDENTITY]
    return [(c, n, c in query_cameras) for c, n in zip(seen, (int(c) for c in counts))]


def _image_name(pid: int, cam: int, seq: int, frame: int, box: int) -> str:
    pid_text = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_text}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg"


def _prepare_split_folders(site_root: Path, overwrite: bool) -> None:
    for split in ("train", "query", "gallery"):
        folder = site_root / split
        if folder.is_dir() and any(folder.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{folder} is not empty; pass overwrite=True to regenerate it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)


def generate_site(
    root: Path, site_index: int, seed: int = 0, style: SiteStyle | None = None, overwrite: bool = False
) -> SiteSummary:
    """Write one site's train/query/gallery folders; returns what was written."""
    style = style or style_for(site_index, seed)
    site_root = Path(root)
    _prepare_split_folders(site_root, overwrite)
    cameras = [make_camera(_rng(seed, site_index, 1, c), style, c) for c in range(style.num_cameras)]
    if style.camera_looks:  # a stream of their own: every other property of a camera stays as it was
        cameras = [replace(cam, look=draw_look(_rng(seed, site_index, 8, c))) for c, cam in enumerate(cameras)]
    summary = SiteSummary(style.name, site_root, {"train": 0, "query": 0, "gallery": 0})
    num_ids = style.num_train_ids + style.num_test_ids
    totals = images_per_identity(style, seed, site_index) if style.images_per_identity is not None else []
    frame = 0
    people: list[Identity] = []
    for local_id in range(num_ids):
        pid = site_index * _PIDS_PER_SITE + local_id + 1
        person_rng = _rng(seed, site_index, 2, local_id)
        if people and person_rng.random() < style.lookalike_share:
            person = make_lookalike(person_rng, people[int(person_rng.integers(len(people)))], style)
        else:
            person = make_identity(person_rng, style)
        people.append(person)
        id_rng = _rng(seed, site_index, 3, local_id)
        is_test = local_id >= style.num_train_ids
        if style.images_per_identity is None:
            sightings = _sightings_per_camera(id_rng, style)
        else:
            sightings = _sightings_of(id_rng, style, totals[local_id])
        for cam_index, count, gives_query in sightings:
            for shot in range(count):
                frame += 1
                image = render(person, cameras[cam_index], _rng(seed, site_index, 4, local_id, cam_index, shot))
                split = "train" if not is_test else ("query" if shot == 0 and gives_query else "gallery")
                name = _image_name(pid, cam_index + 1, 1, frame, shot + 1)
                image.save(site_root / split / name, quality=cameras[cam_index].jpeg_quality)
                summary.counts[split] += 1
    for extra in range(style.num_distractors + style.num_junk):
        frame += 1
        cam_index = extra % style.num_cameras
        rng = _rng(seed, site_index, 5, extra)
        is_junk = extra >= style.num_distractors
        stranger = make_identity(rng, style) if rng.random() < 0.5 or is_junk else None
        image = render(stranger, cameras[cam_index], rng, partial=is_junk)
        image.save(site_root / "gallery" / _image_name(-1 if is_junk else 0, cam_index + 1, 1, frame, 1),
                   quality=cameras[cam_index].jpeg_quality)
        summary.counts["gallery"] += 1
    return summary
