"""A progress bar over a run's rounds, drawn from the server's streamed log lines.

``flwr run --stream`` and ``flwr log --stream`` hand us the ServerApp's log; its lines say when the
run started (how many rounds), when each round finished training and what each evaluation found.
In a terminal the lines scroll above a rich progress bar (rich comes with flwr). In a notebook,
where rich's live display needs ipywidgets, the bar is an IPython display at the top of the cell's
output, updated in place. Anywhere else (a pipe, CI) the lines pass through unchanged and no bar
is drawn.
"""

from __future__ import annotations

import html
import re
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

STARTED = re.compile(r"fedreid run \d+: (?P<algorithm>\S+), .*?, (?P<rounds>\d+) rounds")
RESUMED = re.compile(r"resuming .* after round (?P<round>\d+)")
TRAINED = re.compile(r"round (?P<round>\d+)/(?P<rounds>\d+) trained")
EVALUATED = re.compile(r"round (?P<round>\d+) evaluation.*mean Rank-1 (?P<rank1>[\d.]+)%, mAP (?P<mAP>[\d.]+)%")


class RoundProgress:
    """Feed it log lines (``feed``); use as a context manager around the streaming."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.jupyter = self.console.is_jupyter
        self.live = self.console.is_terminal or self.jupyter
        self.handle: Any = None  # the notebook's display of the bar
        self.started = time.monotonic()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                                 TextColumn("rounds"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[status]}"), console=self.console, transient=False)
        self.task = self.progress.add_task("fedreid", total=None, status="")

    def __enter__(self) -> "RoundProgress":
        if self.jupyter:
            from IPython.display import display  # a notebook always has IPython

            self.handle = display(self._notebook_bar(), raw=True, display_id=True)
        elif self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.update(self._notebook_bar(), raw=True)
        elif self.live:
            self.progress.stop()

    def _notebook_bar(self) -> dict[str, str]:
        """The bar as a notebook shows it: an HTML <progress>, and the same facts as plain text."""
        done, total, status = self.state
        task = self.progress.tasks[0]
        elapsed = time.monotonic() - self.started
        text = (f"{task.description}: {int(done)}/{int(total) if total else '?'} rounds, {elapsed:.0f} s"
                f"{', ' + status if status else ''}")
        return {"text/plain": text,
                "text/html": f"<div class='fedreid-progress'><progress value='{int(done)}' max='{int(total or 1)}' "
                             f"style='width:16em'></progress> {html.escape(text)}</div>"}

    def feed(self, line: str) -> None:
        """Show the line, and move the bar when it reports a start, a round or an evaluation."""
        if self.live:
            self.progress.console.print(Text.from_ansi(line.rstrip("\n")), soft_wrap=True)
        else:
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()
        if match := STARTED.search(line):
            self.progress.update(self.task, description=match["algorithm"], total=int(match["rounds"]))
        elif match := RESUMED.search(line):
            self.progress.update(self.task, completed=int(match["round"]))
        elif match := TRAINED.search(line):
            self.progress.update(self.task, completed=int(match["round"]), total=int(match["rounds"]))
        elif match := EVALUATED.search(line):
            self.progress.update(self.task, status=f"round {match['round']}: mAP {match['mAP']}%, "
                                                   f"R1 {match['rank1']}%")
        else:
            return
        if self.handle is not None:
            self.handle.update(self._notebook_bar(), raw=True)

    @property
    def state(self) -> tuple[float, float | None, str]:
        """(rounds done, rounds planned, latest evaluation): what the bar shows."""
        task = self.progress.tasks[0]
        return task.completed, task.total, str(task.fields["status"])
