"""The README's "From Python" example, run as written except for where the sites are, how many
rounds and the small profile (a real Ray simulation, in this process)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs_and_returns_the_table(tiny_sites: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## From Python", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    assert 'sites="data/synthetic", rounds=20' in code and len(code.strip().splitlines()) == 3
    sites = tmp_path / "sites"
    shutil.copytree(tiny_sites, sites)
    code = code.replace('sites="data/synthetic", rounds=20',
                        f'sites="{sites}", rounds=1, profile="test", generate=False, '
                        f'output_dir="{tmp_path / "outputs"}", flwr_home="{tmp_path / "flwr-home"}"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    result = namespace["result"]
    assert [row["site"] for row in result.table] == ["0-mall", "1-station", "2-campus"]
    assert all(0 <= row["mAP"] <= 100 and row["identities"] > 0 for row in result.table)
    assert "'site': '0-mall'" in capsys.readouterr().out  # what print(result.table) shows
