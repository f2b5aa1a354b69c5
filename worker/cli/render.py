"""Human-readable tables for the CLI (``--json`` gives the machine form)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_PRIORITY = {1: "[bold red]FLAGGED[/]", 2: "[yellow]pending[/]", 3: "routine"}


def _console() -> Console:
    """The terminal's width; when piped to a file or another program, wide enough for UIDs."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=200)


def progress_bar(description: str):
    """A progress bar on stderr (stdout stays clean for ``--json``), gone when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def _probability(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _population(note: str | None) -> str:
    """A population note as the worklist marks it: its words before the colon."""
    return f"[yellow]{escape(note.split(':', 1)[0])}[/]" if note else ""


def worklist_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"Worklist ({len(rows)} studies)")
    for column in ("#", "priority", "p(pneumonia)", "state", "accession", "study date", "images"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    table.add_column("study", overflow="fold", min_width=20)
    table.add_column("received", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("population", no_wrap=True)
    for i, r in enumerate(rows, 1):
        date = r.get("study_date") or ""
        table.add_row(str(i), _PRIORITY.get(r["priority"], str(r["priority"])), _probability(r["max_probability"]),
                      r["state"], r["accession_number"] or "", f"{date[:4]}-{date[4:6]}-{date[6:]}" if date else "",
                      str(r.get("images", "")), r["study_instance_uid"],
                      (r["received_at"] or "")[:19].replace("T", " "), r["model_version"] or "",
                      _population(r.get("population_note")))
    _console().print(table)


def instances_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"Instances ({len(rows)})")
    table.add_column("state", no_wrap=True)
    table.add_column("p", no_wrap=True)
    for column in ("reason or note", "SOP instance", "study"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["state"], _probability(r["probability"]), escape(r["reason"] or r.get("population_note") or ""),
                      r["sop_instance_uid"], r["study_instance_uid"])
    _console().print(table)


def evaluation_table(report: dict[str, Any], *, unreadable: int = 0) -> None:
    table = Table(title=f"Evaluation of model {report['model_version']} on {report['n']} images"
                        + (f" ({unreadable} unreadable left out)" if unreadable else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    intervals = report.get("ci95", {})
    for key in ("auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "threshold"):
        low_high = intervals.get(key)
        table.add_row(key, f"{report[key]:.4f}", f"{low_high[0]:.4f}-{low_high[1]:.4f}" if low_high else "")
    for key, value in report.get("calibration", {}).items():
        table.add_row(f"{key} (calibration)", f"{value:.4f}", "")
    _console().print(table)
    matrix = Table(title="Confusion matrix")
    matrix.add_column("true \\ predicted")
    matrix.add_column("NORMAL", justify="right")
    matrix.add_column("PNEUMONIA", justify="right")
    matrix.add_row("NORMAL", str(report["tn"]), str(report["fp"]))
    matrix.add_row("PNEUMONIA", str(report["fn"]), str(report["tp"]))
    _console().print(matrix)


def predictions_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"Predictions ({len(rows)} files)")
    table.add_column("file", overflow="fold")
    table.add_column("p(pneumonia)", justify="right", no_wrap=True)
    table.add_column("flag", no_wrap=True)
    table.add_column("note", overflow="fold")
    for r in rows:
        flag = "-" if r["flagged"] is None else ("[bold red]FLAGGED[/]" if r["flagged"] else "normal")
        table.add_row(r["path"], _probability(r["probability"]), flag, r["error"] or r.get("heatmap", ""))
    _console().print(table)


def summary_table(title: str, summary: dict[str, Any]) -> None:
    """A command's outcome: its counts, then any list in it as a table of its own."""
    table = Table(title=title)
    table.add_column("")
    table.add_column("", justify="right")
    lists = {}
    for key, value in summary.items():
        if isinstance(value, list):
            lists[key] = value
        elif value is not None:
            table.add_row(key.replace("_", " "), str(value))
    console = _console()
    console.print(table)
    for key, rows in lists.items():
        if not rows:
            continue
        if key == "studies":
            worklist_table(rows)
            continue
        sub = Table(title=key.replace("_", " "))
        for column in rows[0]:
            sub.add_column(column.replace("_", " "), overflow="fold")
        for row in rows:
            sub.add_row(*(str(v) for v in row.values()))
        console.print(sub)
