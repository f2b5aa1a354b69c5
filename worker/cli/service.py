"""The service's processes: `run` (all in one), `listen`, `worker`, `beat`, `db upgrade`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from worker.cli.context import cli, load_settings, log, require_current_schema, sessions
from worker.settings import Settings


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


def _check_population(settings: Settings) -> None:
    """Read the model card's intended population now, so that a card stating it wrongly stops start-up."""
    from model.artifact import ModelArtifactError
    from worker import runtime

    try:
        population = runtime.eligibility_policy(settings).population
    except (ModelArtifactError, ValueError, OSError) as exc:
        raise click.ClickException(f"model artifact: {exc}") from None
    if population is None:
        log.info("the model card states no intended population: every age is screened")
    elif settings.intended_population == "any":
        log.warning("intended population %s: every age is screened (PNEUMOSCREEN_INTENDED_POPULATION=any), "
                    "the others' results marked", population.ages)
    else:
        log.info("intended population %s: films of other ages are SKIPPED", population.ages)


def _start_listener(settings: Settings, *, reuse_port: bool = False):
    from dicom_io.server import start_listener
    from dicom_io.wire import IncompatiblePynetdicomError
    from worker import audit, runtime

    audit.start(settings, "listener")
    try:
        return start_listener(runtime.listener_config(settings, reuse_port=reuse_port), spool=runtime.spool(),
                              sessions=sessions())
    except OSError as exc:
        raise _cannot_listen(settings, exc) from None
    except IncompatiblePynetdicomError as exc:  # the bounds on DICOM peers cannot be set: no listener
        raise click.ClickException(str(exc)) from None


def _cannot_listen(settings: Settings, exc: OSError) -> click.ClickException:
    return click.ClickException(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")


def _check_port_free(settings: Settings) -> None:
    """A clear error now if the DICOM port is taken, rather than receivers that cannot bind it."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            raise _cannot_listen(settings, exc) from None


def _lock_data_dir(settings: Settings):
    """The data directory's listener lock (one listener per data directory), or a clear error."""
    from worker.receivers import ListenerLockedError, hold_listener_lock

    try:
        return hold_listener_lock(settings.data_dir)
    except ListenerLockedError as exc:
        raise click.ClickException(str(exc)) from None


def _receive_into_data_dir(settings: Settings, *, clear: bool) -> None:
    """Receive datasets into the data directory's ``incoming/`` (this process's temporary files),
    on the spool's file system and under its free-space watermark; ``clear``: remove what an
    earlier run left there (associations cut off mid-dataset)."""
    import tempfile

    incoming = settings.incoming_dir
    incoming.mkdir(parents=True, exist_ok=True)
    if clear:
        stale = [p for p in incoming.iterdir() if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d partly received file(s) left in %s", len(stale), incoming)
    tempfile.tempdir = str(incoming)


def _sweep_partial_files() -> None:
    """Remove, in a thread (a large spool takes a while to walk), the files that a listener process
    which died was bringing into the spool."""
    from worker import runtime

    def sweep() -> None:
        try:
            removed = runtime.spool().sweep_partial()
        except OSError as exc:
            log.error("could not clean the spool of partly stored files: %s", exc)
            return
        if removed:
            log.warning("removed %d partly stored file(s) of a listener process that died", removed)

    threading.Thread(target=sweep, name="pneumoscreen-spool-sweep", daemon=True).start()


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


@dataclass(frozen=True)
class Service:
    """What ``run`` and ``listen`` have started: the Celery app, the listener's receiver processes,
    the study dispatcher, and the event that ends their supervision."""

    app: object
    receivers: object
    dispatcher: object
    stopping: threading.Event


@contextlib.contextmanager
def started_service(settings: Settings, *, embedded: bool,
                    stopping: threading.Event | None = None) -> Iterator[Service]:
    """The one start-up of ``run`` (``embedded``) and ``listen``, in order: the data directory's
    lock, ``incoming/`` cleared, the schema (upgraded when embedded, else required current), the
    Celery app configured, what was left in flight re-sent, the listener (in its receiver processes
    only when embedded; else in this process too), the spool swept of dead writers' files, the
    receivers and the dispatcher started. On leaving, everything stops in the reverse order.
    ``stopping`` (default: a new event) ends the supervision (:func:`supervise`)."""
    from db.migrate import upgrade
    from worker.celery_app import configure_app
    from worker.dispatcher import Dispatcher, reconcile
    from worker.receivers import Receivers

    with contextlib.ExitStack() as stack:
        stack.callback(_lock_data_dir(settings).close)
        _receive_into_data_dir(settings, clear=True)
        if embedded:
            upgrade(settings.effective_database_url)
        else:
            require_current_schema(settings)
        app = configure_app(settings)
        # the in-process broker starts empty: whatever was in flight when the last run stopped goes again
        resent = reconcile(sessions(), older_than_seconds=0 if embedded else settings.reconcile_after_seconds)
        if resent:
            log.info("re-sent %d instance(s) left in flight", resent)
        children = settings.listener_processes
        if embedded:
            # in this process the listener would share the interpreter lock with decoding and the workers
            _check_port_free(settings)
        else:
            children -= 1
            if children and settings.effective_database_url.startswith("sqlite"):
                log.warning("%d listener processes on SQLite: its writers take turns across processes; "
                            "use PostgreSQL (PNEUMOSCREEN_DATABASE_URL) for the speed", settings.listener_processes)
            stack.callback(_start_listener(settings, reuse_port=children > 0).shutdown)
        receivers = Receivers.for_listen(children, data_dir=settings.data_dir, host=settings.host,
                                         port=settings.port, ae_title=settings.ae_title)
        _sweep_partial_files()  # before any receiver runs: every writer of an earlier run is gone
        receivers.start()
        stack.callback(receivers.stop)
        if children:
            log.info("%d receiver process(es) on port %d (pids %s)", children, settings.port,
                     ", ".join(map(str, receivers.pids)))
        dispatcher = Dispatcher(sessions(), quiet_seconds=settings.study_quiet_seconds)
        dispatcher.start()
        stack.callback(dispatcher.stop)
        _start_report_feed(settings, stack)
        stopping = stopping or threading.Event()
        stack.callback(stopping.set)
        yield Service(app, receivers, dispatcher, stopping)


def _start_report_feed(settings: Settings, stack: contextlib.ExitStack) -> None:
    """The RIS's final reports over MLLP (PNEUMOSCREEN_HL7_LISTEN_PORT), when set; stopped on leaving."""
    from worker.hl7.listener import start_report_listener

    try:
        feed = start_report_listener(settings, sessions())
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if feed is not None:
        stack.callback(feed.stop)


def supervise(service: Service) -> None:
    """The one supervision loop: start again a receiver that died and clean the spool of what it was
    bringing in, until ``service.stopping`` is set or the dispatcher has stopped."""
    while not service.stopping.wait(0.5):
        if not service.dispatcher.is_alive():
            log.error("the study dispatcher has stopped")
            return
        if service.receivers.check():
            _sweep_partial_files()


@cli.command()
@with_options(listener_options)
@click.option("--concurrency", type=int, default=16, show_default=True,
              help="worker threads (concurrent inference requests form one batch)")
def run(data_dir, host, port, ae_title, concurrency) -> None:
    """All in one: listener + workers + in-process broker + SQLite under the data dir."""
    settings = load_settings(data_dir=data_dir, host=host, port=port, ae_title=ae_title, broker_url="memory://localhost/")
    from celery.beat import EmbeddedService
    from sqlalchemy.engine import make_url

    from worker import audit, runtime
    from worker.celery_app import ALL_QUEUES

    runtime.set_worker_queues(ALL_QUEUES)  # one process: what it prepares goes to its own model
    _load_model(settings)
    _check_population(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    audit.start(settings, "run")  # the listener reports from its receiver processes
    with started_service(settings, embedded=True) as service, contextlib.ExitStack() as stack:
        threading.Thread(target=supervise, args=(service,), name="pneumoscreen-receivers", daemon=True).start()
        # beat (reconciler, nightly rescreen) in a thread of this process: the in-process broker
        # is not shared with another one
        scheduler = EmbeddedService(service.app, thread=True,
                                    schedule_filename=str(settings.data_dir / "celerybeat-schedule"))
        scheduler.start()
        stack.callback(_stop_beat, scheduler)
        log.info("pneumoscreen running: data in %s, database %s", settings.data_dir.resolve(),
                 make_url(settings.effective_database_url).render_as_string(hide_password=True))
        service.app.worker_main(["worker", "--queues", ",".join(ALL_QUEUES), "--pool", "threads",
                                 "--concurrency", str(concurrency), "--hostname", "pneumoscreen-run@%h",
                                 "--loglevel", logging.getLevelName(logging.getLogger().level),
                                 "--without-mingle", "--without-gossip"])


def _stop_beat(scheduler) -> None:
    """Beat wakes at least once a second and then saves its schedule; if that save fails (a full
    or vanished data disk) Celery's stop(wait=True) would wait for ever, so the wait is bounded."""
    scheduler.service.stop()
    scheduler.join(timeout=10)
    if scheduler.is_alive():
        log.warning("beat did not stop within 10 s; leaving it")


@cli.command()
@with_options(listener_options)
@click.option("--receiver", is_flag=True, hidden=True,
              help="an extra listener process started by `listen` (PNEUMOSCREEN_LISTENER_PROCESSES > 1)")
def listen(data_dir, host, port, ae_title, receiver) -> None:
    """The DICOM listener and study dispatcher (production: one, with PNEUMOSCREEN_LISTENER_PROCESSES processes)."""
    settings = load_settings(data_dir=data_dir, host=host, port=port, ae_title=ae_title)
    if receiver:
        _serve_as_receiver(settings)
        return
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with started_service(settings, embedded=False, stopping=stopping) as service:
        try:
            supervise(service)
        except KeyboardInterrupt:
            pass
        log.info("stopping the listener")


def _serve_as_receiver(settings: Settings) -> None:
    """One of the listener processes that ``listen`` or ``run`` started: serve until told to stop
    or until the process that started it is gone."""
    from worker.receivers import serve_until_orphaned_or_stopped

    require_current_schema(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    parent = os.getppid()
    _receive_into_data_dir(settings, clear=False)
    server = _start_listener(settings, reuse_port=True)
    try:
        serve_until_orphaned_or_stopped(stopping, parent)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


@cli.command("worker")
@click.option("--queues", default="preprocess,inference,maintenance", show_default=True,
              help="comma-separated queues to consume")
@click.option("--concurrency", type=int, help="worker threads/processes [inference: PNEUMOSCREEN_INFERENCE_BATCH_SIZE "
              "threads, whose concurrent requests form one batch; otherwise 2]")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default="threads", show_default=True)
def worker_command(queues: str, concurrency: int | None, pool: str) -> None:
    """A Celery worker process (production: preprocess on CPU, inference on GPU)."""
    settings = load_settings()
    if concurrency is None:
        concurrency = settings.inference_batch_size if "inference" in queues.split(",") and pool == "threads" else 2
    from worker.celery_app import ALL_QUEUES, configure_app

    unknown = set(queues.split(",")) - set(ALL_QUEUES)
    if unknown:
        raise click.UsageError(f"unknown queue(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL_QUEUES)}")
    require_current_schema(settings)
    if "inference" in queues.split(","):
        # prefork children load it themselves: TensorFlow must not cross a fork
        _load_model(settings, load=pool != "prefork")
    if "preprocess" in queues.split(","):
        _check_population(settings)
    app = configure_app(settings)
    from worker import audit, runtime

    runtime.set_worker_queues(queues.split(","))
    audit.start(settings, "worker")
    from celery.signals import worker_init

    started_workers: list = []  # worker_main drops the exit code; the worker object keeps it
    worker_init.connect(lambda sender=None, **_: started_workers.append(sender), weak=False)
    started = time.monotonic()
    app.worker_main(["worker", "--queues", queues, "--pool", pool, "--concurrency", str(concurrency),
                     "--hostname", f"pneumoscreen-{queues.replace(',', '-')}@%h",
                     "--loglevel", logging.getLevelName(logging.getLogger().level)])
    code = getattr(started_workers[-1], "exitcode", None) if started_workers else None
    if code:  # stops asked for by a signal (SIGTERM, SIGQUIT, Ctrl+C) end with 0
        _restart_after_crash(code, ran_seconds=time.monotonic() - started)
    sys.exit(code or 0)


_RESTARTS_ENV = "PNEUMOSCREEN_WORKER_RESTARTS"


def _restart_after_crash(code, *, ran_seconds: float, max_quick_restarts: int = 10) -> None:
    """Start this worker again, in the same process (same pid), after Celery stopped on an
    "Unrecoverable error" (exit code 1).

    Celery/kombu can end that way when the broker goes away at the wrong moment (an exception
    while it gives unacknowledged messages back); nothing is lost (messages are acknowledged
    late and the reconciler re-sends what is in flight), but without a supervisor the queue
    would have no consumer. Back-off doubles up to 60 s; after
    ``max_quick_restarts`` in a row that each ran under 5 minutes, the exit stands."""
    restarts = 0 if ran_seconds > 300 else int(os.environ.get(_RESTARTS_ENV, "0"))
    if restarts >= max_quick_restarts:
        log.critical("the worker stopped (exit %s) %d times in a row; giving up", code, restarts + 1)
        return
    delay = min(60.0, 2.0 ** restarts)
    log.error("the Celery worker stopped on an unrecoverable error (exit %s); starting it again in %.0f s",
              code, delay)
    time.sleep(delay)
    os.environ[_RESTARTS_ENV] = str(restarts + 1)
    os.execv(sys.executable, sys.orig_argv)


@cli.command()
def beat() -> None:
    """The scheduler: reconciliation every minute, rescreening at PNEUMOSCREEN_RESCREEN_SCHEDULE (01:00)."""
    settings = load_settings()
    from worker.celery_app import configure_app

    app = configure_app(settings)
    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(schedule=str(schedule), loglevel=logging.getLevelName(logging.getLogger().level)).run()


@cli.group("db")
def database() -> None:
    """Database schema."""


@database.command("upgrade")
def db_upgrade() -> None:
    """Apply Alembic migrations up to the current schema."""
    settings = load_settings()
    from db.migrate import upgrade

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    click.echo("database schema is current")
