"""The round progress bar follows the server's log lines; off a terminal the lines pass through."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from server.progress import RoundProgress

LOG = ["\x1b[92mINFO \x1b[0m:      fedreid run 42: fedpav_kd, resnet10 at 64x32, 20 rounds, outputs in /x\n",
       "INFO :      round 1/20 trained: 3 sites, 62.1 MB down, 62.1 MB up, 3.0 s\n",
       "INFO :      round 2/20 trained: 3 sites, 62.1 MB down, 62.1 MB up, 3.1 s\n",
       "INFO :      round 1 evaluation (carried by round 2's training): mean Rank-1 39.3%, mAP 40.9% over 3 sites\n"]


def test_the_bar_counts_rounds_and_shows_the_latest_evaluation() -> None:
    screen = io.StringIO()
    with RoundProgress(Console(file=screen, force_terminal=True, width=160)) as progress:
        for line in LOG:
            progress.feed(line)
        assert progress.state == (2, 20, "round 1: mAP 40.9%, R1 39.3%")
    shown = screen.getvalue()
    assert "fedpav_kd" in shown and "2/20" in shown and "round 2/20 trained" in shown


def test_a_resumed_run_starts_the_bar_where_it_left_off() -> None:
    with RoundProgress(Console(file=io.StringIO(), force_terminal=True)) as progress:
        progress.feed(LOG[0])
        progress.feed("INFO :      resuming /out/x after round 7 (run 43)\n")
        assert progress.state[:2] == (7, 20)


def test_off_a_terminal_lines_pass_through_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    with RoundProgress(Console(file=io.StringIO(), force_terminal=False, force_jupyter=False)) as progress:
        for line in LOG:
            progress.feed(line)
    assert capsys.readouterr().out == "".join(LOG)
