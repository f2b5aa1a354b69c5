"""``pneumoscreen``: the one command line entry point."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
from pydantic import ValidationError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from worker.settings import Settings  # noqa: E402

log = logging.getLogger("pneumoscreen")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "absl", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_settings(**overrides) -> Settings:
    """Settings from the environment, flags on top; a bad value stops here with a clear message."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()]
        raise click.UsageError("invalid settings:\n" + "\n".join(lines)) from None
    from worker import runtime

    runtime.configure(settings)
    return settings


def _sessions():
    from worker import runtime

    return runtime.sessions()


def _require_current_schema(settings: Settings) -> None:
    from db.migrate import is_current

    if not is_current(settings.effective_database_url):
        raise click.ClickException(
            "the database schema is not at the current version: run `pneumoscreen db upgrade` first"
        )


def _load_model(settings: Settings, *, load: bool = True) -> None:
    """Load the model now, so that a missing or altered artifact stops start-up
    and the first study does not wait for TensorFlow (``load=False``: only verify it)."""
    from model.artifact import ModelArtifactError, read_card
    from worker import runtime

    try:
        card = runtime.load_model().card if load else read_card(settings.model_dir)
    except (ModelArtifactError, ValueError, OSError) as exc:
        raise click.ClickException(f"model artifact: {exc}") from None
    log.info("model %s %s (sha256 %s..., threshold %.4f)", card.name, card.version, card.sha256[:12], card.threshold)


def _start_listener(settings: Settings):
    from dicom_io.server import ListenerConfig, start_listener
    from worker import runtime

    config = ListenerConfig(
        host=settings.host, port=settings.port, ae_title=settings.ae_title,
        allowed_aes=settings.allowed_ae_titles, max_associations=settings.max_associations,
        max_pdu_size=settings.max_pdu_size, network_timeout=settings.network_timeout,
        tls_cert=settings.tls_cert, tls_key=settings.tls_key, tls_client_ca=settings.tls_client_ca,
    )
    return start_listener(config, spool=runtime.spool(), sessions=_sessions())


listener_options = [
    click.option("--data-dir", type=click.Path(path_type=Path), help="spool, SQLite database, logs [PNEUMOSCREEN_DATA_DIR]"),
    click.option("--host", help="address to listen on [PNEUMOSCREEN_HOST, 127.0.0.1]"),
    click.option("--port", type=int, help="DICOM port [PNEUMOSCREEN_PORT, 11112]"),
    click.option("--ae-title", help="our AE title [PNEUMOSCREEN_AE_TITLE, PNEUMOSCREEN]"),
]


def with_options(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, envvar="PNEUMOSCREEN_LOG_LEVEL")
@click.version_option(package_name="pneumoscreen")
def cli(log_level: str) -> None:
    """pneumoscreen: DICOM/PACS-integrated pneumonia screening for chest X-rays."""
    _setup_logging(log_level)


@cli.command()
@with_options(listener_options)
@click.option("--concurrency", type=int, default=16, show_default=True,
              help="worker threads (concurrent inference requests form one batch)")
def run(data_dir, host, port, ae_title, concurrency) -> None:
    """All in one: listener + workers + in-process broker + SQLite under the data dir."""
    settings = _load_settings(data_dir=data_dir, host=host, port=port, ae_title=ae_title, broker_url="memory://localhost/")
    from db.migrate import upgrade
    from worker.celery_app import ALL_QUEUES, configure_app
    from worker.dispatcher import Dispatcher, reconcile

    _load_model(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    app = configure_app(settings)
    # the in-process broker starts empty: whatever was in flight when the last run stopped goes again
    resent = reconcile(_sessions(), older_than_seconds=0)
    if resent:
        log.info("re-sent %d instance(s) left in flight by the previous run", resent)
    server = _start_listener(settings)
    dispatcher = Dispatcher(_sessions(), quiet_seconds=settings.study_quiet_seconds, reconcile_every=60.0,
                            reconcile_after=settings.reconcile_after_seconds)
    dispatcher.start()
    from sqlalchemy.engine import make_url

    log.info("pneumoscreen running: data in %s, database %s", settings.data_dir.resolve(),
             make_url(settings.effective_database_url).render_as_string(hide_password=True))
    try:
        app.worker_main(["worker", "--queues", ",".join(ALL_QUEUES), "--pool", "threads",
                         "--concurrency", str(concurrency), "--hostname", "pneumoscreen-run@%h",
                         "--loglevel", logging.getLevelName(logging.getLogger().level), "--without-mingle",
                         "--without-gossip"])
    finally:
        dispatcher.stop()
        server.shutdown()


@cli.command()
@with_options(listener_options)
def listen(data_dir, host, port, ae_title) -> None:
    """The DICOM listener and study dispatcher (production: one process)."""
    settings = _load_settings(data_dir=data_dir, host=host, port=port, ae_title=ae_title)
    from worker.celery_app import configure_app
    from worker.dispatcher import Dispatcher, reconcile

    _require_current_schema(settings)
    configure_app(settings)
    reconcile(_sessions(), older_than_seconds=settings.reconcile_after_seconds)
    server = _start_listener(settings)
    dispatcher = Dispatcher(_sessions(), quiet_seconds=settings.study_quiet_seconds)
    dispatcher.start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while dispatcher.is_alive() and not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping the listener")
        dispatcher.stop()
        server.shutdown()


@cli.command()
@click.option("--queues", default="preprocess,inference,maintenance", show_default=True,
              help="comma-separated queues to consume")
@click.option("--concurrency", type=int, help="worker threads/processes [inference: PNEUMOSCREEN_INFERENCE_BATCH_SIZE "
              "threads, whose concurrent requests form one batch; otherwise 2]")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default="threads", show_default=True)
def worker(queues: str, concurrency: int | None, pool: str) -> None:
    """A Celery worker process (production: preprocess on CPU, inference on GPU)."""
    settings = _load_settings()
    if concurrency is None:
        concurrency = settings.inference_batch_size if "inference" in queues.split(",") and pool == "threads" else 2
    from worker.celery_app import ALL_QUEUES, configure_app

    unknown = set(queues.split(",")) - set(ALL_QUEUES)
    if unknown:
        raise click.UsageError(f"unknown queue(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL_QUEUES)}")
    _require_current_schema(settings)
    if "inference" in queues.split(","):
        # prefork children load it themselves: TensorFlow must not cross a fork
        _load_model(settings, load=pool != "prefork")
    app = configure_app(settings)
    app.worker_main(["worker", "--queues", queues, "--pool", pool, "--concurrency", str(concurrency),
                     "--hostname", f"pneumoscreen-{queues.replace(',', '-')}@%h",
                     "--loglevel", logging.getLevelName(logging.getLogger().level)])


@cli.command()
def beat() -> None:
    """The scheduler: reconciliation every minute (and, later, overnight rescreening)."""
    settings = _load_settings()
    from worker.celery_app import configure_app

    app = configure_app(settings)
    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(schedule=str(schedule), loglevel=logging.getLevelName(logging.getLogger().level)).run()


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


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply Alembic migrations up to the current schema."""
    settings = _load_settings()
    from db.migrate import upgrade

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    click.echo("database schema is current")


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Kaggle-layout folder: train/{NORMAL,PNEUMONIA}/ (and optionally val/)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--version", "model_version", default="0.1.0", show_default=True)
def train(data_dir: Path, out_dir: Path, epochs: int, seed: int, model_version: str) -> None:
    """Train the screening CNN and write a model artifact."""
    from model.train import TrainingConfig, train as run_training

    card = run_training(data_dir, out_dir, TrainingConfig(epochs=epochs, seed=seed, version=model_version))
    val = card.validation["patient_split"]
    click.echo(f"wrote {out_dir}: threshold {card.threshold:.4f}, validation AUC {val['auc']:.4f}, "
               f"sensitivity {val['sensitivity']:.3f}, specificity {val['specificity']:.3f}")


def _progress(description: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def _score_files(files: list[Path], model, *, batch_size: int = 32):
    """(path, probability or None, error or None) for each file, in batches of ``batch_size``."""
    import numpy as np

    from worker.inputs import UnreadableInput, prepare_any

    results: list[tuple[Path, float | None, str | None]] = []
    with _progress("screening") as progress:
        task = progress.add_task("screening", total=len(files))
        for start in range(0, len(files), batch_size):
            batch, prepared = [], []
            for path in files[start:start + batch_size]:
                try:
                    prepared.append(prepare_any(path))
                    batch.append(path)
                except UnreadableInput as exc:
                    results.append((path, None, str(exc)))
            if prepared:
                for path, p in zip(batch, model.predict(np.stack(prepared))):
                    results.append((path, p, None))
            progress.advance(task, len(files[start:start + batch_size]))
    return results


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model artifact folder [default: PNEUMOSCREEN_MODEL_DIR or the shipped model]")
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write roc.png, confusion_matrix.png and score_histogram.png here")
def evaluate(folder: Path, model_dir: Path | None, as_json: bool, plots_dir: Path | None) -> None:
    """Screen FOLDER/NORMAL and FOLDER/PNEUMONIA (PNG/JPEG or DICOM) and report the figures."""
    import numpy as np

    from model.artifact import get_model
    from model.metrics import binary_report

    settings = _load_settings()
    model = get_model(model_dir or settings.model_dir)
    from worker.inputs import iter_files

    labelled = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        if not (folder / cls).is_dir():
            raise click.UsageError(f"{folder} must hold NORMAL/ and PNEUMONIA/ folders")
        labelled += [(path, label) for path in iter_files([folder / cls])]
    labels_by_path = dict(labelled)
    results = _score_files([p for p, _ in labelled], model)
    unreadable = [(p, e) for p, s, e in results if s is None]
    for path, error in unreadable:
        log.warning("left out, unreadable: %s", error)
    scored = [(labels_by_path[p], s) for p, s, e in results if s is not None]
    if not scored or len({label for label, _ in scored}) < 2:
        raise click.ClickException("need readable images of both classes to evaluate")
    labels = np.array([label for label, _ in scored])
    scores = np.array([s for _, s in scored])
    report = binary_report(labels, scores, model.card.threshold)
    report["model_version"] = model.card.version
    if plots_dir is not None:
        from model.plots import write_evaluation_plots

        for path in write_evaluation_plots(labels, scores, report, plots_dir, title=f"{model.card.name} {model.card.version}"):
            log.info("wrote %s", path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from worker.render import evaluation_table

    evaluation_table(report, unreadable=len(unreadable))


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="one JSON document on stdout")
@click.option("--heatmap", "heatmap_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write a Grad-CAM overlay PNG per image here")
def predict(paths: tuple[Path, ...], model_dir: Path | None, as_json: bool, heatmap_dir: Path | None) -> None:
    """Screen files or folders of DICOM or PNG/JPEG images."""
    from model.artifact import get_model
    from worker.inputs import iter_files

    settings = _load_settings()
    model = get_model(model_dir or settings.model_dir)
    try:
        files = list(iter_files(paths))
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    results = _score_files(files, model)
    card = model.card
    rows = [{"path": str(p), "probability": None if s is None else round(s, 6),
             "flagged": None if s is None else s >= card.threshold, "threshold": round(card.threshold, 6),
             "model_version": card.version, "error": e} for p, s, e in results]
    if heatmap_dir is not None:
        import cv2

        from model.gradcam import gradcam, overlay
        from worker.inputs import prepare_any

        heatmap_dir.mkdir(parents=True, exist_ok=True)
        for row in rows:
            if row["probability"] is None:
                continue
            prepared = prepare_any(Path(row["path"]))
            out = heatmap_dir / f"{Path(row['path']).stem}_gradcam.png"
            cv2.imwrite(str(out), overlay(prepared, gradcam(model.keras_model, prepared)))
            row["heatmap"] = str(out)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from worker.render import predictions_table

        predictions_table(rows)
    if any(r["error"] for r in rows):
        sys.exit(1)


def main() -> None:
    cli(prog_name="pneumoscreen")


if __name__ == "__main__":
    main()
