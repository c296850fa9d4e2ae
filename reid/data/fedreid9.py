"""``synthetic-fedreid9``: nine synthetic camera sites shaped like the FedReID benchmark's nine
datasets, plus two held-out sites whose camera domains none of the nine has.

Sizes follow the datasets' published figures (train identities, images per identity, cameras;
FedReID benchmark table, README "The FedReID benchmark") under one monotone scaling that keeps
their order and fits a 2-core CPU:

    identities'         = max(min_ids, round(0.25 x identities ** 0.75))
    images per identity' = 2 + 0.3 x (images per identity - 2)

so MSMT17's 1,041 x 31.3 becomes 46 x 10.8 and iLIDS-VID's 59 x 4.2 becomes 5 x 2.7: the largest
site holds 38x the training images of the smallest (the real spread is 131x). Test identities
scale the same way with a floor of 16, so that every site's mAP rests on enough queries.
Cameras are the datasets' own counts (MSMT17 15, DukeMTMC-reID 8, Market-1501 6, the rest 2).

Looks differ the way the datasets do: MSMT17 mixes indoor and outdoor light over a wide range,
DukeMTMC-reID is a winter campus (dark coats), Market-1501 a bright summer street, CUHK03 indoor
detected boxes (loose crops), PRID2011 two outdoor cameras with strong, different colour casts,
CUHK01 and VIPeR fix the view per camera (front/back against side), VIPeR and iLIDS-VID are
low-resolution, 3DPeS is seen from above (small people), iLIDS-VID is a crowded airport
(occlusions). Every camera also has a look of its own drawn from one distribution (colour matrix,
tone curves, vignetting and shadows, shot noise: reid/data/camera_looks.py).

Held-out sites (they never train; each has 100 test identities and 12 unlabelled training
identities for AdaBN), in two groups reported apart:

* in-distribution, ``unseen-a`` .. ``unseen-d``: sites drawn, per data seed, from the same
  distribution of looks as the nine (each site parameter uniform between the nine's extremes,
  a resolution profile, set views or crowding as often as among the nine, camera looks from the
  same distribution): new domains of the kind the federation has seen;
* out of range, ``unseen-night`` (infrared cameras: grey, dark, soft) and ``unseen-dusk`` (dusk in
  the rain: very dark, blue cast, blurred, 32x16 captures): looks no training site comes near.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reid.data.synthetic import ResolutionProfile, SiteStyle

FEDERATION = "synthetic-fedreid9"
IN_DISTRIBUTION = ("unseen-a", "unseen-b", "unseen-c", "unseen-d")
OUT_OF_RANGE = ("unseen-night", "unseen-dusk")
HELD_OUT = IN_DISTRIBUTION + OUT_OF_RANGE
MIN_TEST_IDS = 16
HELD_OUT_TEST_IDS = 100
HELD_OUT_TRAIN_IDS = 12  # unlabelled: only for AdaBN under the target-adapted protocol


@dataclass(frozen=True)
class PublishedFigures:
    """A real dataset's size as the FedReID benchmark lists it."""

    name: str
    train_ids: int
    train_images: int
    test_ids: int
    cameras: int

    @property
    def images_per_identity(self) -> float:
        return self.train_images / self.train_ids


PUBLISHED = (  # largest first, by training images
    PublishedFigures("msmt17", 1041, 32621, 3060, 15),
    PublishedFigures("duke", 702, 16522, 702, 8),
    PublishedFigures("market", 751, 12936, 750, 6),
    PublishedFigures("cuhk03", 767, 7365, 700, 2),
    PublishedFigures("prid", 285, 3744, 100, 2),
    PublishedFigures("cuhk01", 485, 1940, 486, 2),
    PublishedFigures("viper", 316, 632, 316, 2),
    PublishedFigures("3dpes", 93, 450, 86, 2),
    PublishedFigures("ilids", 59, 248, 60, 2),
)


def scaled_ids(count: int, floor: int = 3) -> int:
    """The benchmark's identity count on this machine (monotone in ``count``)."""
    return max(floor, round(0.25 * count ** 0.75))


def scaled_images_per_identity(value: float) -> float:
    """Images per identity, compressed towards two (monotone; two stays two)."""
    return 2.0 + 0.3 * (value - 2.0)


FRONT_BACK, SIDE = (0.5, 0.5, 0.0), (0.1, 0.1, 0.8)
_LOOKS = {  # fashion hue/share, wall, floor, gain, cast, blur, scale, and what else sets the site apart
    "msmt17": dict(fashion_hue=0.60, fashion_share=0.35, wall=(170, 165, 160), floor=(120, 118, 112),
                   gain=(0.60, 1.35), cast=0.15, blur=(0.0, 1.0), scale=(0.70, 0.95)),
    "duke": dict(fashion_hue=0.62, fashion_share=0.55, wall=(150, 152, 148), floor=(105, 108, 104),
                 gain=(0.75, 1.15), cast=0.10, blur=(0.0, 0.6), scale=(0.76, 0.94)),
    "market": dict(fashion_hue=0.02, fashion_share=0.30, wall=(215, 205, 185), floor=(165, 155, 140),
                   gain=(0.95, 1.35), cast=0.08, blur=(0.0, 0.8), scale=(0.78, 0.94)),
    "cuhk03": dict(fashion_hue=0.30, fashion_share=0.40, wall=(190, 185, 170), floor=(140, 135, 125),
                   gain=(0.80, 1.10), cast=0.12, blur=(0.3, 1.0), scale=(0.62, 0.98)),
    "prid": dict(fashion_hue=0.10, fashion_share=0.45, wall=(120, 130, 120), floor=(95, 95, 90),
                 gain=(0.60, 1.30), cast=0.30, blur=(0.2, 0.8), scale=(0.72, 0.92)),
    "cuhk01": dict(fashion_hue=0.45, fashion_share=0.40, wall=(175, 180, 170), floor=(130, 128, 120),
                   gain=(0.85, 1.20), cast=0.10, blur=(0.0, 0.4), scale=(0.80, 0.95), camera_views=(FRONT_BACK, SIDE)),
    "viper": dict(fashion_hue=0.85, fashion_share=0.40, wall=(140, 135, 125), floor=(110, 105, 98),
                  gain=(0.70, 1.30), cast=0.20, blur=(0.0, 0.5), scale=(0.74, 0.92), camera_views=(FRONT_BACK, SIDE),
                  resolution=ResolutionProfile("viper", (2.0,), (0.3, 0.8))),
    "3dpes": dict(fashion_hue=0.15, fashion_share=0.40, wall=(160, 170, 150), floor=(150, 150, 140),
                  gain=(0.90, 1.40), cast=0.12, blur=(0.2, 0.8), scale=(0.55, 0.75),
                  resolution=ResolutionProfile("3dpes", (1.5, 2.0), (0.2, 0.6))),
    "ilids": dict(fashion_hue=0.70, fashion_share=0.35, wall=(200, 195, 205), floor=(150, 145, 160),
                  gain=(0.70, 1.10), cast=0.25, blur=(0.2, 0.8), scale=(0.70, 0.90), occlusion=0.35,
                  resolution=ResolutionProfile("ilids", (2.0,), (0.3, 0.8))),
}


def training_styles() -> list[SiteStyle]:
    """The nine sites, largest first."""
    return [SiteStyle(name=figures.name, num_train_ids=scaled_ids(figures.train_ids),
                      num_test_ids=scaled_ids(figures.test_ids, MIN_TEST_IDS), num_cameras=figures.cameras,
                      images_per_identity=round(scaled_images_per_identity(figures.images_per_identity), 2),
                      camera_looks=True, **_LOOKS[figures.name])  # type: ignore[arg-type]
            for figures in PUBLISHED]


def _between(rng: np.random.Generator, values: list[float]) -> float:
    return float(rng.uniform(min(values), max(values)))


def in_distribution_style(name: str, rng: np.random.Generator) -> SiteStyle:
    """A held-out site drawn from the nine's distribution of looks (see the module's docstring)."""
    looks = list(_LOOKS.values())

    def colour(key: str) -> tuple[int, int, int]:
        return tuple(int(_between(rng, [look[key][i] for look in looks])) for i in range(3))  # type: ignore[return-value]

    def span(key: str) -> tuple[float, float]:
        low, high = sorted(_between(rng, [look[key][i] for look in looks]) for i in range(2))  # type: ignore[index]
        return (low, max(high, low + 0.05))

    extra: dict[str, object] = {}
    if rng.random() < sum("resolution" in look for look in looks) / len(looks):
        factor = float(rng.choice([1.5, 2.0]))
        extra["resolution"] = ResolutionProfile(name, (factor,), (0.2, 0.8))
    if rng.random() < sum("camera_views" in look for look in looks) / len(looks):
        extra["camera_views"] = (FRONT_BACK, SIDE)
    if rng.random() < sum("occlusion" in look for look in looks) / len(looks):
        extra["occlusion"] = 0.35
    return SiteStyle(name=name, num_train_ids=HELD_OUT_TRAIN_IDS, num_test_ids=HELD_OUT_TEST_IDS,
                     num_cameras=int(rng.integers(2, 7)), images_per_identity=4.0, camera_looks=True,
                     fashion_hue=float(rng.random()),
                     fashion_share=_between(rng, [look["fashion_share"] for look in looks]),  # type: ignore[misc]
                     wall=colour("wall"), floor=colour("floor"), gain=span("gain"),
                     cast=_between(rng, [look["cast"] for look in looks]),  # type: ignore[misc]
                     blur=span("blur"), scale=span("scale"), **extra)  # type: ignore[arg-type]


def held_out_styles(seed: int = 0) -> list[SiteStyle]:
    """The six held-out sites of data seed ``seed``: four in-distribution ones, then night and dusk.
    Their training images exist only for AdaBN (labels unused: they never train)."""
    rng = np.random.default_rng([seed, 9001])
    common = dict(num_train_ids=HELD_OUT_TRAIN_IDS, num_test_ids=HELD_OUT_TEST_IDS, num_cameras=3,
                  images_per_identity=4.0, camera_looks=True)
    return [in_distribution_style(name, rng) for name in IN_DISTRIBUTION] + [
        SiteStyle(name="unseen-night", fashion_hue=0.5, fashion_share=0.3, wall=(90, 95, 100), floor=(60, 62, 66),
                  gain=(0.50, 0.90), cast=0.05, blur=(0.4, 1.2), scale=(0.70, 0.92), infrared=True,
                  **common),  # type: ignore[arg-type]
        SiteStyle(name="unseen-dusk", fashion_hue=0.58, fashion_share=0.4, wall=(70, 80, 105), floor=(50, 55, 70),
                  gain=(0.45, 0.70), cast=0.30, blur=(0.8, 1.6), scale=(0.68, 0.90),
                  resolution=ResolutionProfile("dusk", (4.0,), (0.6, 1.2)), **common),  # type: ignore[arg-type]
    ]


def styles(seed: int = 0) -> list[SiteStyle]:
    """All fifteen: the nine training sites, then the six held-out ones of data seed ``seed``."""
    return training_styles() + held_out_styles(seed)
