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
(occlusions). The held-out sites: ``unseen-night`` (infrared cameras: grey, dark, soft) and
``unseen-dusk`` (dusk in the rain: very dark, blue cast, blurred, 32x16 captures).
"""

from __future__ import annotations

from dataclasses import dataclass

from reid.data.synthetic import ResolutionProfile, SiteStyle

FEDERATION = "synthetic-fedreid9"
HELD_OUT = ("unseen-night", "unseen-dusk")
MIN_TEST_IDS = 16
HELD_OUT_TEST_IDS = 40


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
                      **_LOOKS[figures.name])  # type: ignore[arg-type]
            for figures in PUBLISHED]


def held_out_styles() -> list[SiteStyle]:
    """Two camera domains none of the nine has; their training images exist only so that a model
    can compute BatchNorm statistics there (labels unused: they never train)."""
    common = dict(num_train_ids=12, num_test_ids=HELD_OUT_TEST_IDS, num_cameras=3, images_per_identity=4.0)
    return [
        SiteStyle(name="unseen-night", fashion_hue=0.5, fashion_share=0.3, wall=(90, 95, 100), floor=(60, 62, 66),
                  gain=(0.50, 0.90), cast=0.05, blur=(0.4, 1.2), scale=(0.70, 0.92), infrared=True,
                  **common),  # type: ignore[arg-type]
        SiteStyle(name="unseen-dusk", fashion_hue=0.58, fashion_share=0.4, wall=(70, 80, 105), floor=(50, 55, 70),
                  gain=(0.45, 0.70), cast=0.30, blur=(0.8, 1.6), scale=(0.68, 0.90),
                  resolution=ResolutionProfile("dusk", (4.0,), (0.6, 1.2)), **common),  # type: ignore[arg-type]
    ]


def styles() -> list[SiteStyle]:
    """All eleven: the nine training sites, then the two held-out ones."""
    return training_styles() + held_out_styles()
