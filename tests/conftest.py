"""Shared fixtures: small synthetic sites written once per test session."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from reid.data.synthetic import DEFAULT_STYLES, generate_site

# Messages built in tests are created as if inside run 1 (Flower stamps them with these ids).
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 0

# A deliberately small site so that training and evaluation in tests take seconds.
TINY_STYLE = replace(DEFAULT_STYLES[0], name="tiny", num_train_ids=8, num_test_ids=6, num_cameras=3,
                     num_distractors=3, num_junk=2)


@pytest.fixture(scope="session")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic site in the Market layout (read-only for tests)."""
    root = tmp_path_factory.mktemp("sites") / "tiny"
    generate_site(root, site_index=0, seed=11, style=TINY_STYLE)
    return root


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small sites with different styles under one root, as a simulation expects."""
    root = tmp_path_factory.mktemp("federation")
    for index in range(3):
        style = replace(DEFAULT_STYLES[index], num_train_ids=8, num_test_ids=6, num_distractors=2, num_junk=1)
        generate_site(root / f"{index}-{style.name}", site_index=index, seed=5, style=style)
    return root
