"""`pneumoscreen worklist` and `pneumoscreen instances`: reading the results."""

from __future__ import annotations

import json

import click

from worker.cli import _load_settings, _require_current_schema, _sessions, cli


@cli.command()
@click.option("--flagged-only", is_flag=True, help="only studies the model flagged")
@click.option("--limit", type=int, help="at most N studies")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def worklist(flagged_only: bool, limit: int | None, as_json: bool) -> None:
    """Studies in reading order: flagged first."""
    settings = _load_settings()
    _require_current_schema(settings)
    from db.queries import worklist as worklist_rows

    with _sessions().begin() as session:
        rows = worklist_rows(session, flagged_only=flagged_only, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from worker.render import worklist_table

    worklist_table(rows)


@cli.command()
@click.option("--state", type=click.Choice(["RECEIVED", "QUEUED", "PREPROCESSED", "PREDICTED", "SKIPPED", "FAILED"]))
@click.option("--limit", type=int)
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def instances(state: str | None, limit: int | None, as_json: bool) -> None:
    """Every received instance with its state and reason."""
    settings = _load_settings()
    _require_current_schema(settings)
    from db.models import InstanceState
    from db.queries import list_instances

    with _sessions().begin() as session:
        rows = list_instances(session, state=InstanceState(state) if state else None, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from worker.render import instances_table

    instances_table(rows)
