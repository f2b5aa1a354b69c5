"""The work behind the tasks, as plain functions (testable without Celery).

``preprocess_instance``: spool file -> eligibility -> display pixels ->
shared preprocessing; ``predict_and_record``: prepared images -> one batched
forward pass -> Prediction rows (the inference worker's batcher, the embedded
rescreen and the tests all go through it). Every instance that enters ends PREDICTED, SKIPPED or
FAILED with a reason.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.errors import BytesLengthException, InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from db.drift import record_inputs
from db.models import InstanceState
from db.queries import bounded_reason, paths_and_states, record_predictions, register_model, set_state, touch_instances
from dicom_io.eligibility import EligibilityPolicy
from dicom_io.spool import Spool
from model.artifact import LoadedModel
from model.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION
from worker.images import UnreadableInput, prepare_film

log = logging.getLogger(__name__)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_prepared(image: np.ndarray) -> str:
    """A prepared square uint8 image as its raw bytes in base64 (encoding and decoding it cost a tenth
    of a PNG's; the broker carries 67 KB instead of about 40 KB for a 224 x 224 film)."""
    if image.dtype != np.uint8 or image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"not a prepared square grey uint8 image: {image.dtype} {image.shape}")
    return base64.b64encode(np.ascontiguousarray(image).tobytes()).decode("ascii")


def decode_prepared(payload: str) -> np.ndarray:
    """The image of ``encode_prepared``. Compatibility: a PNG payload serves the inference messages of
    releases 0.4.0 and earlier (raw bytes since 0.5.0); remove the PNG branch with ``tasks._ids``, in the
    first release after 0.6.0 whose upgrade notes ask for the queues to be drained."""
    data = base64.b64decode(payload)
    if data.startswith(_PNG_SIGNATURE):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None or image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError("payload is not a prepared grey uint8 image")
        return image
    side = math.isqrt(len(data))
    if side == 0 or side * side != len(data):
        raise ValueError(f"payload of {len(data)} bytes is not a square uint8 image")
    return np.frombuffer(data, np.uint8).reshape(side, side)


def finish_instance(sessions: sessionmaker[Session], instance_id: int, state: InstanceState, reason: str,
                    path: str | None = None, level: int = logging.INFO) -> None:
    """End ``instance_id`` in ``state`` (SKIPPED or FAILED) with ``reason``, committed, and log it. A reason
    quoting what a file holds (a parser's message) is cut to ``db.queries.MAX_REASON`` characters."""
    reason = bounded_reason(reason)
    with sessions.begin() as session:
        set_state(session, instance_id=instance_id, state=state, reason=reason, path=path)
    log.log(level, "instance %d %s: %s", instance_id, state.value, reason)


def _fail(sessions: sessionmaker[Session], spool: Spool | None, instance_id: int, path: str, reason: str) -> None:
    """FAILED with ``reason``; the file moves to the quarantine (when there is one to move)."""
    moved = None
    if spool is not None and Path(path).is_file():
        try:
            moved = str(spool.quarantine(Path(path), reason, name=Path(path).stem))
        except OSError as exc:
            log.error("instance %d: could not quarantine %s: %s", instance_id, path, exc)
    finish_instance(sessions, instance_id, InstanceState.FAILED, reason, path=moved)


def preprocess_instance(sessions: sessionmaker[Session], instance_id: int, *,
                        policy: EligibilityPolicy, spool: Spool | None = None,
                        size: int = INPUT_SIZE, version: str = PREPROCESSING_VERSION) -> np.ndarray | None:
    """The prepared image for ``instance_id``, or None if it ended SKIPPED/FAILED (or already had).

    With ``spool``, the file of a FAILED instance is moved to its quarantine.
    """
    prepared = preprocess_instances(sessions, [instance_id], policy=policy, spool=spool, size=size, version=version)
    return prepared[0][1] if prepared else None


def preprocess_instances(sessions: sessionmaker[Session], instance_ids: list[int], *,
                         policy: EligibilityPolicy, spool: Spool | None = None,
                         size: int = INPUT_SIZE,
                         version: str = PREPROCESSING_VERSION) -> list[tuple[int, np.ndarray]]:
    """(instance id, prepared image of side ``size`` at preprocessing ``version``, the model card's
    ``input_size`` and ``preprocessing_version``) for each of ``instance_ids`` that could be
    prepared, in order;
    the others end SKIPPED or FAILED with their reason (or had already ended). The instances are
    read in one query and marked PREPROCESSED, each with its population note (or none), in one
    transaction: the note stands beside the result the prediction then records.

    With ``spool``, the file of a FAILED instance is moved to its quarantine.
    """
    with sessions.begin() as session:
        found = paths_and_states(session, ids=instance_ids)
    prepared: list[tuple[int, np.ndarray]] = []
    notes: dict[int, str | None] = {}
    inputs: dict[int, dict] = {}  # what each film looked like going in, for the drift check
    for instance_id in instance_ids:
        if instance_id not in found:
            log.warning("instance %d is not in the database", instance_id)
            continue
        path, state = found[instance_id]
        if state.is_terminal:
            continue
        try:
            ds = dcmread(path)
            eligibility = policy.judge(ds)
        except (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, TypeError, KeyError,
                AttributeError) as exc:  # an element whose value does not fit its VR surfaces only when read
            _fail(sessions, spool, instance_id, path, f"file could not be read: {type(exc).__name__}: {exc}")
            continue
        if not eligibility.eligible:
            finish_instance(sessions, instance_id, InstanceState.SKIPPED, eligibility.reason or "not eligible")
            continue
        try:
            film, image = prepare_film(ds, size, version)
        except (UnreadableInput, MemoryError) as exc:
            _fail(sessions, spool, instance_id, path, str(exc) or type(exc).__name__)
            continue
        prepared.append((instance_id, image))
        inputs[instance_id] = {"rows": film.shape[0], "columns": film.shape[1], "brightness": cv2.mean(film)[0],
                               "manufacturer": ds.get("Manufacturer"), "modality": ds.get("Modality")}
        notes[instance_id] = eligibility.note
        if eligibility.note:
            log.info("instance %d: %s", instance_id, eligibility.note)
    if prepared:
        with sessions.begin() as session:
            touch_instances(session, ids=[instance_id for instance_id, _ in prepared],
                            state=InstanceState.PREPROCESSED, notes=notes)
            record_inputs(session, inputs=inputs)
    return prepared


def predict_and_record(sessions: sessionmaker[Session], model: LoadedModel,
                       items: list[tuple[int, np.ndarray]]) -> list[float]:
    """The one path from prepared images to stored answers: one forward pass for ``items``
    (instance id, prepared image), each answer flagged by the model card's rule and stored under
    the card's model, in one transaction. Returns the probabilities, in order."""
    if not items:
        return []
    probabilities = [float(p) for p in model.predict(np.stack([image for _, image in items]))]
    card = model.card
    answers = [(instance_id, p, card.flags(p)) for (instance_id, _), p in zip(items, probabilities)]
    with sessions.begin() as session:
        if card.version not in _registered:
            register_model(session, name=card.name, version=card.version, weights_sha256=card.sha256,
                           threshold=card.threshold, preprocessing_version=card.preprocessing_version,
                           card_json=json.dumps(asdict(card), sort_keys=True))
        created = record_predictions(session, model_name=card.name, model_version=card.version,
                                     weights_sha256=card.sha256, threshold=card.threshold, results=answers)
    _registered.add(card.version)
    for instance_id, probability, _ in answers:
        if instance_id in created:
            log.info("instance %d PREDICTED p=%.4f (%s %s)", instance_id, probability, card.name, card.version)
        else:
            log.info("instance %d: %s %s had already answered; kept the first answer", instance_id,
                     card.name, card.version)
    return probabilities


#: model versions this process has recorded in the model_version table
_registered: set[str] = set()
