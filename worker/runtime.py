"""Process-wide resources, made once per process on first use: the settings,
the database engine and session factory, the spool, the eligibility policy and
the listener's configuration (from the settings), the model card (its intended population and
input size), the model and its micro-batcher. Worker child processes make their
own (an engine must not cross a fork)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker
from dicom_io.eligibility import EligibilityPolicy, IntendedPopulation
from dicom_io.spool import Spool
from worker.settings import Settings

if TYPE_CHECKING:
    from dicom_io.server import ListenerConfig
    from model.artifact import ModelCard
    from worker.batching import BatchPredictor

_lock = threading.RLock()
_settings: Settings | None = None
_sessions: tuple[int, sessionmaker[Session]] | None = None
_batchers: dict[tuple[int, str], "BatchPredictor"] = {}
_cards: dict[str, ModelCard] = {}
_worker_queues: frozenset[str] = frozenset()
_prepared_store: tuple[int, object] | None = None


def configure(settings: Settings) -> None:
    """Install ``settings`` for this process (the CLI calls this once at start-up)."""
    global _settings, _sessions, _prepared_store
    with _lock:
        _settings, _sessions, _prepared_store = settings, None, None


def settings() -> Settings:
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings()
        return _settings


def sessions() -> sessionmaker[Session]:
    global _sessions
    current = settings()
    with _lock:
        if _sessions is None or _sessions[0] != os.getpid():
            _sessions = (os.getpid(), make_sessionmaker(make_engine(current.effective_database_url)))
        return _sessions[1]


def request_session() -> Iterator[Session]:
    """A session per HTTP request (a FastAPI dependency of the API and the pages), closed afterwards."""
    with sessions()() as session:
        yield session


def set_worker_queues(queues) -> None:
    """The queues this process's Celery worker consumes (``run`` and ``worker`` say so before it starts)."""
    global _worker_queues
    with _lock:
        _worker_queues = frozenset(queues)


def infers_here() -> bool:
    """True when this worker serves both the preprocess and the inference queue and
    ``PNEUMOSCREEN_INLINE_INFERENCE`` allows it: the films it prepares go to its own model, with no
    second message (``pneumoscreen run`` always; a ``worker`` started with both queues)."""
    from worker.celery_app import INFERENCE_QUEUE, PREPROCESS_QUEUE

    return settings().inline_inference != "no" and {PREPROCESS_QUEUE, INFERENCE_QUEUE} <= _worker_queues


def prepared_store(*, reading: bool = False):
    """This process's :class:`worker.prepared.RedisPreparedStore` (on the broker's Redis), or None
    when the images it prepares travel in the messages (``PNEUMOSCREEN_PREPARED_STORE``). With
    ``reading``, the store a message that names stored images points at: the broker's Redis, whatever
    this process's own choice (None only when the broker is not Redis)."""
    global _prepared_store
    from worker.prepared import RedisPreparedStore

    current = settings()
    if not (current.broker_is_redis if reading else current.prepared_in_redis):
        return None
    with _lock:
        if _prepared_store is None or _prepared_store[0] != os.getpid():
            _prepared_store = (os.getpid(), RedisPreparedStore.from_url(current.broker_url,
                                                                        current.prepared_ttl_seconds))
        return _prepared_store[1]


def spool() -> Spool:
    current = settings()
    return Spool(current.spool_dir, quarantine_root=current.quarantine_dir,
                 min_free_bytes=current.min_free_mb * 1024 * 1024)


def eligibility_policy(current: Settings | None = None, *, model_dir: str | Path | None = None) -> EligibilityPolicy:
    """Which instances are screened, from ``current`` (default: this process's settings) and the
    intended population of the model in ``model_dir`` (default: the configured one)."""
    current = current or settings()
    return EligibilityPolicy(modalities=current.eligible_modality_set, chest_body_parts=current.chest_body_part_set,
                             min_side=current.min_image_side,
                             population=intended_population(model_dir or current.model_dir),
                             screen_any_age=current.intended_population == "any")


def model_card(model_dir: str | Path | None = None) -> ModelCard:
    """The card in ``model_dir`` (default: the shipped model), read once per process; the weights are
    not read (the inference worker verifies them)."""
    from model.artifact import read_card

    key = str(Path(model_dir).resolve()) if model_dir else ""
    with _lock:
        if key not in _cards:
            _cards[key] = read_card(model_dir, verify=False)
        return _cards[key]


def intended_population(model_dir: str | Path | None = None) -> IntendedPopulation | None:
    """The intended population the card in ``model_dir`` (default: the shipped model) states."""
    return IntendedPopulation.from_card(model_card(model_dir).intended_population)


def input_size(model_dir: str | Path | None = None) -> int:
    """The side of the square image the model in ``model_dir`` (default: the configured one) takes."""
    return model_card(model_dir or settings().model_dir).input_size


def preprocessing_version(model_dir: str | Path | None = None) -> str:
    """The preprocessing version the model in ``model_dir`` (default: the configured one) was trained
    with, at which every film for it is prepared."""
    return model_card(model_dir or settings().model_dir).preprocessing_version


def listener_config(current: Settings | None = None, *, reuse_port: bool = False) -> "ListenerConfig":
    """How the listener talks to the network, from ``current`` (default: this process's settings)."""
    from dicom_io.server import ListenerConfig

    current = current or settings()
    return ListenerConfig(
        host=current.host, port=current.port, ae_title=current.ae_title, allowed_aes=current.allowed_ae_titles,
        max_associations=current.max_associations, max_pdu_size=current.max_pdu_size,
        network_timeout=current.network_timeout, artim_timeout=current.artim_timeout,
        max_pending_connections=current.max_pending_connections, max_dataset_bytes=current.max_dataset_mb << 20,
        max_host_share=current.max_host_share,
        tls_cert=current.tls_cert, tls_key=current.tls_key, tls_client_ca=current.tls_client_ca,
        reuse_port=reuse_port,
    )


def batch_predictor(model_dir: str | None = None) -> "BatchPredictor":
    """This process's micro-batcher around the model in ``model_dir`` (default: the configured one)."""
    from worker.batching import BatchPredictor

    current = settings()
    key = (os.getpid(), str(model_dir or current.model_dir or ""))
    with _lock:
        if key not in _batchers:
            _batchers[key] = BatchPredictor(sessions(), load_model(model_dir), max_batch=current.inference_batch_size,
                                            max_wait_ms=current.inference_batch_ms)
        return _batchers[key]


_tf_configured: int | None = None


def load_model(model_dir: str | None = None):
    """The model in ``model_dir`` (default: the configured one), loaded once per process,
    after TensorFlow is configured from the settings."""
    global _tf_configured
    from model.artifact import configure_tensorflow, get_model

    current = settings()
    if _tf_configured != os.getpid():
        configure_tensorflow(intra_op_threads=current.tf_threads, inter_op_threads=current.tf_threads)
        _tf_configured = os.getpid()
    return get_model(model_dir or current.model_dir)


def _delivery_resources():
    from worker.delivery import Resources

    return Resources(model=load_model)


def destinations():
    """The destinations this process's settings send new results to (every kind), built in
    ``worker.delivery.config``."""
    from worker.delivery import configured_destinations

    return configured_destinations(settings(), _delivery_resources())


def delivery_resolver():
    """``(kind, address) -> Destination`` for the delivery rows this process sends."""
    from worker.delivery import resolver

    return resolver(settings(), _delivery_resources())
