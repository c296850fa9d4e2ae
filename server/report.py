"""``report.html``: one self-contained page per run, for a person.

Everything a run folder holds that a reader needs at a glance: the per-site table, metrics.png
(embedded as data, so the file travels alone), bytes per round, the sites rejected or failed and
why, and the configuration. Plain HTML and inline CSS: no server, no script, any browser.

    python -m server.report outputs/<run folder>     # (re)write it for a finished or older run
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from server.outputs import CONFIG_FILE, METRICS_FILE, PLOT_FILE, TABLE_HEADER, site_facts, table_rows, unseen_rows

REPORT_FILE = "report.html"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.facts { color: #555; } table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child, table.text td, table.text th { text-align: left; vertical-align: top; } th { background: #f4f4f4; }
tr.mean td { font-weight: 600; border-top: 2px solid #bbb; } img { max-width: 100%; }
details pre { max-width: 700px; white-space: pre-wrap; text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
.ok { color: #2a7a2a; } .bad { color: #b02a2a; }
"""


class Markup(str):
    """A cell that is HTML already (escaped where it had to be)."""


def _table(header: list[str] | tuple[str, ...], rows: list[list[str]], mean_last: bool = False,
           text: bool = False) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        mark = ' class="mean"' if mean_last and index == len(rows) - 1 else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{c if isinstance(c, Markup) else html.escape(str(c))}</td>"
                                            for c in row) + "</tr>")
    kind = ' class="text"' if text else ""
    return f"<table{kind}><thead><tr>{cells}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _results(rounds: list[dict[str, Any]]) -> str:
    evaluated = [r for r in rounds if r.get("evaluate") and r["evaluate"].get("sites")]
    if not evaluated:
        return "<p>No evaluation was completed yet.</p>"
    last = evaluated[-1]
    caption = (f"<p>After round {last['round']}: the global model on each site's own query/gallery, in percent. "
               f"mAP counts queries with a true match; mAP (Market) is Market-1501's over all queries.</p>")
    table = caption + _table(TABLE_HEADER, table_rows(last["evaluate"]["sites"], site_facts(rounds)), mean_last=True)
    held_out = unseen_rows(last.get("unseen"))
    if not held_out:
        return table
    return table + ("<p>Held-out sites, which never trained: the same model on their own query/gallery "
                    "(generalisation to camera domains no site trained on); source-only: ranked with no image of "
                    "theirs first; target-adapted: after AdaBN on their unlabelled images.</p>"
                    + _table(TABLE_HEADER, held_out, mean_last=False))


def _megabytes(count: float) -> str:
    return f"{count / 1e6:.2f}"


def _bytes_per_round(rounds: list[dict[str, Any]]) -> str:
    trained = [r for r in rounds if r.get("train")]
    if not trained:
        return "<p>No training round was recorded.</p>"
    rows = []
    for record in trained:
        train = record["train"]
        rows.append([record["round"], len(train.get("sites") or {}), _megabytes(train["bytes"].get("sent", 0)),
                     _megabytes(train["bytes"].get("received", 0)), f"{train.get('seconds', 0.0):.1f}"])
    total_up = sum(r["train"]["bytes"].get("received", 0) for r in trained)
    total_down = sum(r["train"]["bytes"].get("sent", 0) for r in trained)
    rows.append(["all", "", _megabytes(total_down), _megabytes(total_up), ""])
    return _table(["round", "sites trained", "MB down", "MB up", "seconds"], rows, mean_last=True)


ANSI = re.compile(r"\x1b?\[[0-9;]*m")


def _reason(text: str) -> str:
    """A reason as a cell: one line that says what went wrong, the whole text (a site error's
    traceback) folded underneath when there is more."""
    text = ANSI.sub("", str(text)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return html.escape(text)
    if "Message: " in text:  # Flower's ClientAppException wraps the site's own message
        summary = text.rsplit("Message: ", 1)[1].strip().splitlines()[0]
    else:
        summary = next((line for line in reversed(lines) if re.match(r"[\w.]*(Error|Exception)\b.*:", line)),
                       lines[-1])
    return f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>"


def _incidents(rounds: list[dict[str, Any]]) -> str:
    rows = []
    for record in rounds:
        for phase in ("train", "evaluate", "unseen"):
            part = record.get(phase) or {}
            for site, reason in sorted((part.get("rejected") or {}).items()):
                rows.append([record["round"], phase, site, "rejected", Markup(_reason(reason))])
            for site in part.get("failed") or []:
                rows.append([record["round"], phase, site, "failed",
                             "did not answer within the round (stopped, unreachable or too slow)"])
    if not rows:
        return '<p class="ok">None: every site that was asked answered, and every update was accepted.</p>'
    return _table(["round", "phase", "site", "what", "why"], rows, text=True)


def _figure(folder: Path) -> str:
    plot = folder / PLOT_FILE
    if not plot.is_file():
        return "<p>No figure yet (it is drawn after the first evaluation).</p>"
    data = base64.b64encode(plot.read_bytes()).decode("ascii")
    return f'<img alt="Rank-1, mAP and bytes per round" src="data:image/png;base64,{data}">'


def _facts(config: str, rounds: list[dict[str, Any]]) -> str:
    """One line: algorithm, model, how far the run got and when."""
    try:
        cfg = OmegaConf.create(config)
        setup = (f"{cfg.algorithm.name}, {cfg.model.backbone} at {cfg.model.height}x{cfg.model.width}, "
                 f"{cfg.federation.rounds} round(s) planned; ")
    except Exception:  # an older or hand-edited config.yaml: the report still comes out
        setup = ""
    last = rounds[-1] if rounds else {}
    trained = len([r for r in rounds if r.get("train")])
    return (f"{setup}{trained} training round(s) recorded, the last at {last.get('time', '-')}, "
            f"{last.get('elapsed_s', 0.0):.0f} s after the start")


def render_report(folder: Path) -> str:
    """The page for the run in ``folder``, from what the folder holds now."""
    lines = (folder / METRICS_FILE).read_text().splitlines() if (folder / METRICS_FILE).is_file() else []
    rounds = [json.loads(line) for line in lines if line.strip()]
    config = (folder / CONFIG_FILE).read_text() if (folder / CONFIG_FILE).is_file() else "(no config.yaml)"
    facts = _facts(config, rounds)
    sections = [("Per-site results", _results(rounds)), ("Rank-1, mAP and bytes over rounds", _figure(folder)),
                ("Bytes per training round", _bytes_per_round(rounds)),
                ("Rejected or failed sites", _incidents(rounds)),
                ("Configuration", f"<pre>{html.escape(config)}</pre>")]
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    title = html.escape(f"fedreid run {folder.name}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1><p class=\"facts\">{html.escape(facts)}</p>"
            f"{body}</body></html>\n")


def write_report(folder: Path) -> Path:
    """Write ``report.html`` into the run folder (whole or not at all: temp file, then rename)."""
    path = folder / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_report(folder), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write report.html for a fedreid run folder.")
    parser.add_argument("run_dir", type=Path)
    folder = parser.parse_args(argv).run_dir
    if not (folder / METRICS_FILE).is_file():
        parser.error(f"{folder} is not a fedreid run folder: it has no {METRICS_FILE}")
    print(write_report(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
