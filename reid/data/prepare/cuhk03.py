"""CUHK03 under the new protocol (Zhong et al., CVPR'17): 767 training / 700 test identities.

Inputs, in RAW_DIR (or its ``cuhk03_release/``):

- ``cuhk-03.mat``: the original release (MATLAB v7.3 = HDF5). ``detected`` and ``labeled`` are
  cells of the 5 camera pairs; each pair is an N x 10 cell of images (columns 0-4 from one camera,
  5-9 from the other), stored transposed, empty cells for missing images.
- ``cuhk03_new_protocol_config_detected.mat`` / ``..._labeled.mat``: the new protocol's file list
  (``<pair>_<pid>_<view>_<image>.png``), labels, camera ids and 1-based train/query/gallery indices.

Images are decoded from the .mat once and written as PNG under Market-style names with the
protocol's label as pid and its camera id (1 or 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from reid.data.layout import DatasetLayoutError
from reid.data.prepare.big import find_root
from reid.data.prepare.site_writer import SiteWriter, market_name


def protocol_file_name(pair: int, person: int, image: int) -> str:
    """The new protocol's name for image ``image`` (0-9) of person ``person`` (0-based) in ``pair``."""
    view = 1 if image < 5 else 2
    return f"{pair + 1}_{person + 1:03d}_{view}_{image + 1:02d}.png"


def iter_mat_images(mat_path: Path, variant: str) -> Iterator[tuple[str, np.ndarray]]:
    """(protocol file name, HxWx3 uint8 image) for every non-empty image of ``variant``."""
    import h5py

    with h5py.File(mat_path, "r") as mat:
        if variant not in mat:
            raise DatasetLayoutError(f"{mat_path} has no '{variant}' cell (keys: {sorted(mat.keys())})")
        for pair, pair_ref in enumerate(np.asarray(mat[variant]).ravel()):
            cells = np.asarray(mat[pair_ref]).T  # (persons, 10) references
            for person in range(cells.shape[0]):
                for image in range(cells.shape[1]):
                    pixels = np.asarray(mat[cells[person, image]]).T
                    if pixels.ndim != 3 or pixels.size == 0:
                        continue  # an empty cell: this camera has fewer images of the person
                    yield protocol_file_name(pair, person, image), np.ascontiguousarray(pixels, dtype=np.uint8)


def read_protocol(config_path: Path) -> dict[str, Any]:
    """File names, labels, camera ids and 0-based split indices of the new protocol."""
    from scipy.io import loadmat

    config = loadmat(str(config_path))
    missing = [k for k in ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx") if k not in config]
    if missing:
        raise DatasetLayoutError(f"{config_path} lacks {missing}; is it a CUHK03 new-protocol config file?")
    names = [str(np.squeeze(entry)) for entry in config["filelist"].ravel()]
    labels = config["labels"].ravel().astype(int)
    cameras = config["camId"].ravel().astype(int)
    splits = {split: config[f"{split}_idx"].ravel().astype(int) - 1 for split in ("train", "query", "gallery")}
    for split, indices in splits.items():
        if len(indices) and (indices.min() < 0 or indices.max() >= len(names)):
            raise DatasetLayoutError(f"{config_path}: {split}_idx points outside the file list")
    return {"names": names, "labels": labels, "cameras": cameras, "splits": splits}


def prepare_cuhk03(raw: Path, writer: SiteWriter, variant: str = "detected", **_: Any) -> dict[str, Any]:
    config_name = f"cuhk03_new_protocol_config_{variant}.mat"
    root = find_root(raw, ("cuhk-03.mat", config_name), ("cuhk03_release", "cuhk03"))
    protocol = read_protocol(root / config_name)
    wanted = {protocol["names"][i] for indices in protocol["splits"].values() for i in indices}
    images = {name: pixels for name, pixels in iter_mat_images(root / "cuhk-03.mat", variant) if name in wanted}
    missing = 0
    for split, indices in protocol["splits"].items():
        for i in indices:
            name = protocol["names"][i]
            if name not in images:
                missing += 1
                continue
            writer.save_array(split, images[name],
                              market_name(int(protocol["labels"][i]), int(protocol["cameras"][i]), int(i) + 1, ".png"))
    return {"source": str(root), "variant": variant, "listed_but_missing_in_mat": missing}
