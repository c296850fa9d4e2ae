"""The synthetic camera sites: deterministic bytes, disjoint identities, non-IID sites."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid.data.dataset import load_reid_data
from reid.data.federations import generate_sites, site_names
from reid.data.synthetic import generate_site
from tests.conftest import TINY_STYLE


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    generate_site(tmp_path / "a", site_index=1, seed=4, style=TINY_STYLE)
    generate_site(tmp_path / "b", site_index=1, seed=4, style=TINY_STYLE)
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(first) > 50 and first == second


def test_another_seed_writes_other_images(tmp_path: Path) -> None:
    generate_site(tmp_path / "a", site_index=1, seed=4, style=TINY_STYLE)
    generate_site(tmp_path / "b", site_index=1, seed=5, style=TINY_STYLE)
    assert set(_digest(tmp_path / "a").values()).isdisjoint(_digest(tmp_path / "b").values())


def test_existing_images_are_not_overwritten_silently(tmp_path: Path) -> None:
    generate_site(tmp_path / "a", site_index=0, seed=1, style=TINY_STYLE)
    with pytest.raises(FileExistsError, match="not empty"):
        generate_site(tmp_path / "a", site_index=0, seed=1, style=TINY_STYLE)
    generate_site(tmp_path / "a", site_index=0, seed=2, style=TINY_STYLE, overwrite=True)


def test_default_sites_are_disjoint_differently_sized_and_styled(tmp_path: Path) -> None:
    summaries = generate_sites(tmp_path, num_sites=3, seed=0)
    assert [s.root.name for s in summaries] == site_names(3, 0) == ["0-mall", "1-station", "2-campus"]
    sites = [load_reid_data(s.root) for s in summaries]
    pid_sets = [{x.pid for x in d.train + d.query + d.gallery} - {0} for d in sites]
    assert all(a.isdisjoint(b) for i, a in enumerate(pid_sets) for b in pid_sets[i + 1:])
    sizes = [len(d.train) for d in sites]
    assert len(set(sizes)) == 3 and sizes == sorted(sizes, reverse=True)
    assert all(len({x.camid for x in d.train}) >= 3 for d in sites)  # several cameras per site
    means = [np.mean([np.asarray(Image.open(x.path), dtype=np.float32).mean((0, 1)) for x in d.train[:60]], axis=0)
             for d in sites]
    # sites differ in overall colour (lighting, backgrounds, fashion): mean RGB differs clearly
    assert min(np.abs(means[i] - means[j]).max() for i in range(3) for j in range(i + 1, 3)) > 5


def test_every_identity_is_seen_by_two_cameras_and_queries_have_cross_camera_matches(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site)
    for pid in {s.pid for s in data.train}:
        assert len({s.camid for s in data.train if s.pid == pid}) >= 2
    for query in data.query:
        assert any(g.pid == query.pid and g.camid != query.camid for g in data.gallery)
