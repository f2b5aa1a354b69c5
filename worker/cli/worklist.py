"""`pneumoscreen worklist` and `pneumoscreen instances`: reading the results.

Every query is written to the audit log (actor ``cli:<os user>``), like the HTTP API's.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime

import click

from worker.cli.context import DATE, cli, day_bounds, load_settings, require_current_schema, sessions


def audit(action: str, params: dict, result_count: int | None) -> None:
    """One audit row for a command-line query."""
    from db.audit import record_audit

    with sessions().begin() as session:
        record_audit(session, actor=f"cli:{getpass.getuser()}", client=None, action=action,
                     params={k: v for k, v in params.items() if v not in (None, False)}, status=200,
                     result_count=result_count)


@cli.command()
@click.option("--flagged-only", is_flag=True, help="only studies the model flagged")
@click.option("--since", type=DATE, help="received on or after this day (YYYY-MM-DD)")
@click.option("--until", type=DATE, help="received on or before this day (YYYY-MM-DD)")
@click.option("--state", type=click.Choice(["IN_PROGRESS", "SCREENED", "FAILED", "NOT_SCREENED"]),
              help="only studies in this state")
@click.option("--order", type=click.Choice(["probability", "received"]),
              help="within a priority [PNEUMOSCREEN_WORKLIST_ORDER, probability]")
@click.option("--limit", type=click.IntRange(min=1), help="at most N studies")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def worklist(flagged_only: bool, since: datetime | None, until: datetime | None, state: str | None,
             order: str | None, limit: int | None, as_json: bool) -> None:
    """Studies in reading order: flagged first (highest probability first), then
    studies in progress or with failed images, then the rest."""
    settings = load_settings()
    require_current_schema(settings)
    from db.results import worklist as worklist_rows

    received_since, received_until = day_bounds(since, until, settings.timezone)
    with sessions().begin() as session:
        rows = worklist_rows(session, flagged_only=flagged_only, limit=limit, received_since=received_since,
                             received_until=received_until, state=state, order=order or settings.worklist_order)
    audit("worklist", {"flagged_only": flagged_only, "since": since and since.date().isoformat(),
                       "until": until and until.date().isoformat(), "state": state, "limit": limit}, len(rows))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from worker.cli.render import worklist_table

    worklist_table(rows)


@cli.command()
@click.option("--state", type=click.Choice(["RECEIVED", "QUEUED", "PREPROCESSED", "PREDICTED", "SKIPPED", "FAILED"]))
@click.option("--study", "study_uid", help="only this StudyInstanceUID")
@click.option("--limit", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def instances(state: str | None, study_uid: str | None, limit: int | None, as_json: bool) -> None:
    """Every received instance with its state and reason."""
    settings = load_settings()
    require_current_schema(settings)
    from db.models import InstanceState
    from db.results import list_instances

    with sessions().begin() as session:
        rows = list_instances(session, state=InstanceState(state) if state else None, limit=limit,
                              study_instance_uid=study_uid)
    audit("instances", {"state": state, "study": study_uid, "limit": limit}, len(rows))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from worker.cli.render import instances_table

    instances_table(rows)
