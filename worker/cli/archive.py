"""`pneumoscreen ingest` and `pneumoscreen rescreen`: bringing the archive in
and screening it again."""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime
from pathlib import Path

import click

from worker.cli.context import DATE, cli, day_bounds, load_settings, require_current_schema, sessions
from worker.cli.render import progress_bar

log = logging.getLogger("pneumoscreen")

def _emit(summary: dict, as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from worker.cli.render import summary_table

    summary_table(title, summary)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def ingest(folder: Path, as_json: bool) -> None:
    """Import the DICOM files under FOLDER (recursively) as if a PACS had sent them.

    Each file is copied into the spool and recorded exactly like a C-STORE;
    the running service (`run`, or `listen` + workers) screens them once each
    study has been quiet for PNEUMOSCREEN_STUDY_QUIET_SECONDS. FOLDER is not changed.
    """
    settings = load_settings()
    require_current_schema(settings)
    from dicom_io.handlers import StoreContext
    from dicom_io.ingest import candidate_files, ingest_file
    from dicom_io.status import StoreStatus
    from worker import runtime

    logging.getLogger("dicom_io.handlers").setLevel(logging.WARNING)  # one line per file: the summary says it
    files = list(candidate_files(folder))
    context = StoreContext.for_database(runtime.spool(), sessions())
    counts: Counter[str] = Counter()
    refused: list[dict] = []
    with progress_bar("importing") as progress:
        task = progress.add_task("import", total=len(files))
        for path in files:
            outcome = ingest_file(path, context)
            if outcome is None:
                counts["not_dicom"] += 1
            elif outcome.status == StoreStatus.SUCCESS:
                counts["stored" if outcome.created else "duplicates"] += 1
            else:
                counts["refused"] += 1
                refused.append({"file": str(path.relative_to(folder)), "status": f"0x{int(outcome.status):04X}",
                                "reason": outcome.reason})
                if outcome.status == StoreStatus.OUT_OF_RESOURCES:
                    progress.stop()
                    raise click.ClickException(f"stopped at {path}: {outcome.reason}")
            progress.advance(task)
    context.io.shutdown()
    summary = {"files": len(files), "stored": counts["stored"], "duplicates": counts["duplicates"],
               "not_dicom": counts["not_dicom"], "refused": counts["refused"], "refused_files": refused}
    _emit(summary, as_json, f"Imported {folder}")
    if not as_json and counts["stored"]:
        click.echo(f"{counts['stored']} instance(s) recorded; the running service screens them "
                   f"{settings.study_quiet_seconds:g} s after their study's last image.", err=True)


@cli.command()
@click.option("--since", type=DATE, help="received (with --from-pacs: study date) on or after this day")
@click.option("--until", type=DATE, help="received (with --from-pacs: study date) on or before this day")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model artifact folder [default: the configured model]; inference workers must be able to read it")
@click.option("--from-pacs", "pacs", metavar="AET@HOST:PORT",
              help="find CR/DX studies on this PACS (C-FIND) and pull them to our listener (C-MOVE)")
@click.option("--include-known", is_flag=True, help="with --from-pacs: pull studies already received too")
@click.option("--include-skipped", is_flag=True,
              help="also the instances that ended SKIPPED, judged again with the current settings (for instance "
                   "the films of other ages after PNEUMOSCREEN_INTENDED_POPULATION=any)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for the results and report them")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="seconds to wait at most")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
def rescreen(since: datetime | None, until: datetime | None, model_dir: Path | None, pacs: str | None,
             include_known: bool, include_skipped: bool, wait: bool, timeout: float, as_json: bool) -> None:
    """Screen stored studies again with a (new) model version, or pull studies from a PACS.

    Without --from-pacs: every stored instance received in the date range that
    the model version has not answered goes through the pipeline again (through
    the workers when there is a shared broker and database, otherwise in this
    process); the
    report says which studies became flagged or unflagged. With --from-pacs:
    the PACS's CR/DX studies of that study-date range are moved to our listener
    (the PACS must know our AE title as a modality) and screened as they arrive.
    """
    settings = load_settings()
    require_current_schema(settings)
    if pacs:
        if model_dir is not None:
            raise click.UsageError("--model does not apply to --from-pacs (studies are screened by the workers' model)")
        if include_skipped:
            raise click.UsageError("--include-skipped does not apply to --from-pacs")
        _rescreen_from_pacs(settings, pacs, since, until, include_known, wait, timeout, as_json)
    else:
        _rescreen_stored(settings, since, until, model_dir, include_skipped, wait, timeout, as_json)


def _rescreen_stored(settings, since, until, model_dir, include_skipped, wait, timeout, as_json) -> None:
    from db.results import rescreen_changes
    from model.artifact import ModelArtifactError, read_card
    from worker import rescreen, runtime

    try:
        card = read_card(model_dir or settings.model_dir)
    except (ModelArtifactError, ValueError, OSError) as exc:
        raise click.ClickException(f"model artifact: {exc}") from None
    received_since, received_until = day_bounds(since, until, settings.timezone)
    here = not settings.shares_broker  # the embedded default: no workers to hand the work to
    if not here:
        from worker.celery_app import configure_app

        configure_app(settings)
    model_arg = str(model_dir.resolve()) if model_dir else None
    with progress_bar(f"queueing for model {card.version}") as progress:
        task = progress.add_task("queue", total=None)
        queued = rescreen.requeue(sessions(), model_card=card, model_dir=model_arg, since=received_since,
                                  until=received_until, include_skipped=include_skipped, send=not here,
                                  progress=lambda n: progress.advance(task, n))
    left = queued.count
    if queued.count and here:
        # no shared broker (the embedded default): screen in this process, batched
        model = runtime.load_model(model_arg)
        with progress_bar(f"screening with {card.version}") as progress:
            task = progress.add_task("screen", total=queued.count)
            rescreen.screen_here(sessions(), queued.ids, model=model,
                                             policy=runtime.eligibility_policy(model_dir=model_arg),
                                             spool=runtime.spool(), batch_size=settings.inference_batch_size,
                                             progress=lambda n: progress.advance(task, n))
        left = rescreen.open_count(sessions(), queued.ids)
        _send_reports_here(settings, queued.ids, card.version)
    elif queued.count and wait:
        with progress_bar(f"workers screening with {card.version}") as progress:
            task = progress.add_task("screen", total=queued.count)
            left = rescreen.wait(sessions(), queued.ids, timeout=timeout,
                                 progress=lambda n: progress.advance(task, n))
    with sessions().begin() as session:
        changes = rescreen_changes(session, instance_ids=queued.ids, model_version=card.version)
    summary = {"model_version": card.version, "queued": queued.count, "still_open": left, **changes}
    _emit(summary, as_json, f"Rescreen with model {card.version}")
    if left and wait:
        raise SystemExit(1)


def _send_reports_here(settings, instance_ids: list[int], model_version: str) -> None:
    """Results for studies screened in this process, to every configured destination; one a destination
    refuses stays PENDING for the service."""
    from worker import delivery, runtime

    destinations = runtime.destinations()
    if not destinations or not instance_ids:
        return
    delivery.deliver_here(sessions(), instance_ids=instance_ids, model_version=model_version,
                          destinations=destinations, resolve=runtime.delivery_resolver(),
                          claim_seconds=settings.results_claim_seconds)


def _rescreen_from_pacs(settings, pacs, since, until, include_known, wait, timeout, as_json) -> None:
    from db.results import known_studies, worklist
    from dicom_io.scu import DeliveryError, Peer, echo, find_studies, move_study
    from worker import audit, rescreen

    audit.start(settings, "rescreen")  # the C-FIND is reported as a Query

    try:
        peer = Peer.parse(pacs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--from-pacs") from None
    ourselves = Peer(settings.ae_title, "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host,
                     settings.port)
    try:
        echo(ourselves, calling_ae=settings.ae_title)
    except DeliveryError:
        raise click.ClickException(
            f"our listener does not answer at {ourselves.host}:{ourselves.port}: start `pneumoscreen run` "
            "(or `listen` and the workers) first; the PACS sends the studies there") from None
    try:
        matches = find_studies(peer, calling_ae=settings.ae_title, since=since and since.date(),
                               until=until and until.date())
    except DeliveryError as exc:
        raise click.ClickException(f"C-FIND on {pacs}: {exc}") from None
    with sessions().begin() as session:
        known = known_studies(session, study_instance_uids=[m.study_instance_uid for m in matches])
    todo = [m for m in matches if include_known or m.study_instance_uid not in known]
    moved = Counter()
    failures = []
    with progress_bar(f"pulling from {peer.ae_title}") as progress:
        task = progress.add_task("move", total=len(todo))
        for match in todo:
            try:
                result = move_study(peer, match.study_instance_uid, calling_ae=settings.ae_title,
                                    move_destination=settings.ae_title)
                moved["studies"] += 1
                moved["instances"] += result.completed
                moved["failed"] += result.failed
            except DeliveryError as exc:
                failures.append({"study_instance_uid": match.study_instance_uid, "reason": str(exc)})
            progress.advance(task)
    uids = [m.study_instance_uid for m in todo]
    still_open = None
    if wait and uids:
        with progress_bar("screening the pulled studies") as progress:
            task = progress.add_task("screen", total=moved["instances"] or None)
            still_open = rescreen.wait_for_studies(sessions(), uids, expected=moved["instances"], timeout=timeout,
                                                   progress=lambda n: progress.advance(task, n))
    with sessions().begin() as session:
        rows = worklist(session, study_instance_uids=uids) if uids else []
    summary = {"found": len(matches), "already_received": len(matches) - len(todo), "moved_studies": moved["studies"],
               "moved_instances": moved["instances"], "failed_instances": moved["failed"],
               "failed_studies": failures, "still_open": still_open,
               "flagged_studies": sum(1 for r in rows if r["flagged"]), "studies": rows}
    _emit(summary, as_json, f"Pulled from {peer.ae_title}")
    if failures or (still_open and wait):
        raise SystemExit(1)
