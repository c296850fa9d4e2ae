"""The app folder ``flwr run`` packages, without the folders it would only walk and throw away.

``flwr run <folder>`` builds the FAB by walking every file under the folder and only then
filtering them with the project's ``.gitignore`` and Flower's include/exclude rules. In a checkout
that walk goes through ``.venv`` (a CUDA torch is ~100,000 files) and costs ~5 s per run on two
CPU cores. ``staged_app`` copies the same folder into a temporary one, leaving out the directories
those very rules exclude whole (``.venv/``, ``/data/``, ``/outputs/``, ...): the FAB built from the
copy is byte for byte the one Flower builds from the folder (tests/test_simulation_e2e.py checks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flwr.cli.utils import build_pathspec, load_gitignore_patterns
from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

_PROBE = "__fedreid_probe__"  # a file name no pattern names: matched only through its folder


def _excluded_folders(app_dir: Path):  # noqa: ANN202 - a predicate on relative folder paths
    gitignore = app_dir / ".gitignore"
    patterns = load_gitignore_patterns(gitignore) if gitignore.is_file() else []
    if any(p.startswith("!") for p in patterns):  # a negation may re-include files of an ignored folder
        return lambda relative: False
    specs = (build_pathspec(patterns), build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS))
    return lambda relative: any(spec.match_file(f"{relative}/{_PROBE}") for spec in specs)


@contextmanager
def staged_app(app_dir: Path) -> Iterator[Path]:
    """A temporary copy of ``app_dir`` without the folders Flower would exclude whole; removed afterwards."""
    app_dir = app_dir.resolve()
    excluded = _excluded_folders(app_dir)
    with tempfile.TemporaryDirectory(prefix="fedreid-app-") as temporary:
        target = Path(temporary) / app_dir.name
        for folder, subfolders, files in os.walk(app_dir, followlinks=False):
            relative = Path(folder).relative_to(app_dir)
            subfolders[:] = [d for d in subfolders if not excluded((relative / d).as_posix())]
            (target / relative).mkdir(parents=True, exist_ok=True)
            for name in files:
                source = Path(folder) / name
                if source.is_symlink():  # Flower skips these too
                    continue
                shutil.copy2(source, target / relative / name)
        yield target
