"""The work behind the tasks, without Celery: every instance ends PREDICTED,
SKIPPED or FAILED with a reason."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from celery import Celery
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import text

from db.models import InstanceState
from db.results import list_instances
from db.session import make_engine, make_sessionmaker
from dicom_io.pixels import display_image
from model.artifact import get_model
from model.preprocessing import INPUT_SIZE, prepare, read_image_file
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG, chest_dataset, write_chest_dicom
from tests.helpers.processes import Process, cli_env, run_cli, wait_until
from tests.helpers.records import receive_file
from worker import pipeline
from worker.runtime import eligibility_policy
from worker.settings import Settings


def _receive(sessions, path: Path, ds) -> int:
    with sessions.begin() as s:
        return receive_file(s, path, ds)


POLICY = eligibility_policy(Settings(_env_file=None))
"""What the settings' defaults screen."""


def _state(sessions) -> tuple[str, str | None]:
    with sessions() as s:
        [row] = list_instances(s)
    return row["state"], row["reason"]


def test_eligible_instance_is_prepared(sessions, tmp_path):
    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG)
    prepared = pipeline.preprocess_instance(sessions, _receive(sessions, tmp_path / "a.dcm", ds), policy=POLICY)
    assert prepared.shape == (INPUT_SIZE, INPUT_SIZE)
    assert _state(sessions) == ("PREPROCESSED", None)
    assert np.array_equal(pipeline.decode_prepared(pipeline.encode_prepared(prepared)), prepared)


def test_prepared_payloads_of_this_and_the_earlier_version_decode_and_garbage_is_refused():
    image = np.arange(INPUT_SIZE * INPUT_SIZE, dtype=np.uint32).astype(np.uint8).reshape(INPUT_SIZE, INPUT_SIZE)
    assert len(pipeline.encode_prepared(image)) == 4 * ((INPUT_SIZE * INPUT_SIZE + 2) // 3)
    png = base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode("ascii")  # queued by an earlier version
    assert np.array_equal(pipeline.decode_prepared(png), image)
    for garbage in ("", base64.b64encode(b"\x00" * 1000).decode(), base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()):
        with pytest.raises(ValueError):
            pipeline.decode_prepared(garbage)
    with pytest.raises(ValueError):
        pipeline.encode_prepared(np.zeros((4, 5), np.uint8))


@pytest.mark.parametrize("kwargs, reason", [
    ({"view_position": "LL"}, "lateral"),
    ({"modality": "MR"}, "modality MR is not screened"),
    ({"body_part": "KNEE"}, "body part KNEE is not chest"),
    ({"body_part": "CHESTNUT"}, "body part CHESTNUT is not chest"),
    ({"body_part": "CHEST LAT"}, "names a lateral view"),
    ({"sop_class": "DX", "modality": "DX", "presentation_intent": "FOR PROCESSING"}, "FOR PROCESSING"),
    ({"patient_age": "045Y"}, "outside the model's intended population: patient aged 45 years"),
])
def test_ineligible_instance_is_skipped_with_a_reason(sessions, tmp_path, kwargs, reason):
    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG, **kwargs)
    assert pipeline.preprocess_instance(sessions, _receive(sessions, tmp_path / "a.dcm", ds), policy=POLICY) is None
    state, why = _state(sessions)
    assert state == "SKIPPED" and reason in why


@pytest.mark.parametrize("body_part", ["CHEST", "chest", "CHEST PA", "CHEST_AP", "PORT CHEST", "THORAX AP", "CXR",
                                       "LUNGS"])
def test_chest_like_body_parts_are_screened(sessions, tmp_path, body_part, invalid_dicom_allowed):
    # "chest" in lower case is not a valid CS, and some modalities send it so: pydicom only warns here
    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG, body_part=body_part)
    assert pipeline.preprocess_instance(sessions, _receive(sessions, tmp_path / "a.dcm", ds), policy=POLICY) is not None
    assert _state(sessions) == ("PREPROCESSED", None)


def test_the_instances_prepared_together_keep_each_its_population_note(sessions, tmp_path):
    films = {"child": {}, "unknown": {"birth_date": None}, "adult": {"patient_age": "045Y"}}
    ids = {}
    for name, attributes in films.items():
        ds = write_chest_dicom(tmp_path / f"{name}.dcm", PNEUMONIA_JPEG, **attributes)
        ids[name] = _receive(sessions, tmp_path / f"{name}.dcm", ds)
    any_age = eligibility_policy(Settings(_env_file=None, intended_population="any"))
    prepared = pipeline.preprocess_instances(sessions, list(ids.values()), policy=any_age)
    assert [instance_id for instance_id, _ in prepared] == list(ids.values())
    with sessions() as s:
        rows = {row["sop_instance_uid"]: row for row in list_instances(s)}
    notes = [row["population_note"] for row in rows.values()]
    assert {row["state"] for row in rows.values()} == {"PREPROCESSED"}
    assert notes == [None, "age unknown: not confirmed within the intended population (ages 1-5)",
                     "outside the intended population: patient aged 45 years (trained on ages 1-5)"]


def _view_code(meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399348003", "SCT", meaning
    return code


@pytest.mark.parametrize("attributes, reason", [
    ({"ViewCodeSequence": [_view_code("latero-medial")]}, "view code latero-medial"),
    ({"ViewCodeSequence": [_view_code("left lateral")]}, "view code left lateral"),
    ({"PatientOrientation": ["P", "F"]}, "patient orientation P\\F"),
    ({"SeriesDescription": "Thorax lat."}, "SeriesDescription 'THORAX LAT.'"),
    ({"ProtocolName": "CHEST_LATERAL"}, "ProtocolName 'CHEST_LATERAL'"),
])
def test_a_film_without_view_position_is_known_as_lateral_by_its_other_attributes(attributes, reason):
    ds = chest_dataset(PNEUMONIA_JPEG, view_position=None)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    verdict = POLICY.judge(ds)
    assert not verdict.eligible and verdict.reason.startswith(reason) and "lateral view" in verdict.reason


@pytest.mark.parametrize("attributes", [
    {},
    {"ViewCodeSequence": [_view_code("postero-anterior")]},
    {"PatientOrientation": ["L", "F"]},
    {"SeriesDescription": "CHEST PA", "ProtocolName": "Thorax p.a."},
    {"SeriesDescription": "PLATE 2"},  # LAT only as a whole word
    {"SeriesDescription": "CHEST PA AND LAT"},  # a study's description copied to each series names both
])
def test_a_frontal_film_without_view_position_is_screened(attributes):
    ds = chest_dataset(PNEUMONIA_JPEG, view_position=None)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    assert POLICY.judge(ds).eligible


def test_view_position_decides_when_present():
    ds = chest_dataset(PNEUMONIA_JPEG, view_position="PA")
    ds.SeriesDescription = "THORAX LAT"  # a description that contradicts ViewPosition does not win
    assert POLICY.judge(ds).eligible


def test_truncated_file_fails_with_a_reason(sessions, tmp_path):
    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG)
    data = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "a.dcm").write_bytes(data[: len(data) // 2])
    assert pipeline.preprocess_instance(sessions, _receive(sessions, tmp_path / "a.dcm", ds), policy=POLICY) is None
    state, why = _state(sessions)
    assert state == "FAILED" and why


def test_missing_spool_file_fails_with_a_reason(sessions, tmp_path):
    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG)
    instance_id = _receive(sessions, tmp_path / "a.dcm", ds)
    (tmp_path / "a.dcm").unlink()
    assert pipeline.preprocess_instance(sessions, instance_id, policy=POLICY) is None
    state, why = _state(sessions)
    assert state == "FAILED" and "could not be read" in why


class _TinyModel:
    """A stand-in with the LoadedModel interface around a tiny Keras model built here."""

    def __init__(self):
        import keras

        from model.artifact import ModelCard

        inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3))
        outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
        self.keras_model = keras.Model(inputs, outputs)
        self.card = ModelCard(name="tiny", version="t1", sha256="a" * 64, threshold=0.5, input_size=INPUT_SIZE,
                              preprocessing_version="1")

    def predict(self, prepared):
        from model.preprocessing import to_model_input

        return [float(p) for p in np.asarray(self.keras_model(to_model_input(prepared))).reshape(-1)]


def test_predict_and_record_stores_the_flagged_answer_once(sessions, tmp_path):
    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG)
    instance_id = _receive(sessions, tmp_path / "a.dcm", ds)
    prepared = pipeline.preprocess_instance(sessions, instance_id, policy=POLICY)
    model = _TinyModel()
    [p] = pipeline.predict_and_record(sessions, model, [(instance_id, prepared)])
    pipeline.predict_and_record(sessions, model, [(instance_id, prepared)])  # redelivered
    with sessions() as s:
        [row] = list_instances(s)
        [flagged] = s.execute(text("SELECT flagged FROM prediction")).scalars().all()
    assert row["state"] == InstanceState.PREDICTED.value
    assert row["probability"] == pytest.approx(p, abs=1e-6) and row["model_version"] == "t1"
    assert bool(flagged) is model.card.flags(p)
    # a terminal instance is not processed again
    assert pipeline.preprocess_instance(sessions, instance_id, policy=POLICY) is None


def test_a_task_that_gives_up_marks_the_instance_failed_with_the_reason(sessions, sqlite_url, tmp_path):
    from worker import runtime, tasks
    from worker.settings import Settings

    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG)
    instance_id = _receive(sessions, tmp_path / "a.dcm", ds)
    runtime.configure(Settings(database_url=sqlite_url))
    try:
        tasks.infer.on_failure(ConnectionError("broker gone"), "task-id", (instance_id, "payload"), {}, None)
    finally:
        runtime.configure(Settings())
    state, reason = _state(sessions)
    assert state == "FAILED"
    assert "pneumoscreen.infer gave up" in reason and "ConnectionError: broker gone" in reason


@contextlib.contextmanager
def _sent_back_rig(pg_url: str, redis_url: str, processes, tmp_path: Path):
    """A received film (its row in PostgreSQL) and Redis, for the cases where an inference worker
    sends an instance back to the preprocess queue. Yields (env, sessions, broker, path, instance id)."""
    env = cli_env(database_url=pg_url, broker_url=redis_url, data_dir=tmp_path / "data", inference_batch_ms=1)
    run_cli("db", "upgrade", env=env)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    broker = redis.Redis.from_url(redis_url)
    try:
        path = tmp_path / "a.dcm"
        instance_id = _receive(sessions, path, write_chest_dicom(path, PNEUMONIA_JPEG))
        yield env, sessions, broker, path, instance_id
    finally:
        broker.close()
        engine.dispose()


def _start_inference_until_sent_back(env, sessions, broker, processes, tmp_path: Path) -> Process:
    """Start an inference worker; wait for the instance to wait alone in the preprocess queue, still open."""
    inference = Process(["worker", "--queues", "inference"], env, tmp_path / "inference.log")
    processes.append(inference)
    wait_until(lambda: broker.llen("preprocess") == 1 and broker.llen("inference") == 0, timeout=120,
               what="the instance sent back to the preprocess queue")
    assert _state(sessions)[0] not in ("FAILED", "PREDICTED")
    assert "sent back to be prepared again" in inference.log()
    return inference


def _preprocess_until_final(env, sessions, processes, tmp_path: Path) -> dict:
    """Start a preprocess worker; the instance's row once it has ended."""
    processes.append(Process(["worker", "--queues", "preprocess"], env, tmp_path / "preprocess.log"))
    wait_until(lambda: _state(sessions)[0] in ("FAILED", "PREDICTED"), timeout=120, what="a final state")
    with sessions() as s:
        [row] = list_instances(s)
    return row


@pytest.mark.slow
def test_an_image_queued_by_an_older_preprocessing_goes_back_to_the_preprocess_queue(pg_url, redis_url, processes,
                                                                                    tmp_path):
    # An infer message from before an upgrade carries no preprocessing version (version "1", the
    # resize alone); the shipped model expects the current one. The inference worker runs where the
    # spool is not (the file is moved away while it works): it must send the instance back to the
    # preprocess queue rather than read the file or predict from the stale tensor.
    model = get_model()
    side = model.card.input_size  # the stale tensor has the model's shape: only its version tells it apart
    with _sent_back_rig(pg_url, redis_url, processes, tmp_path) as (env, sessions, broker, path, instance_id):
        stale = cv2.resize(read_image_file(NORMAL_JPEG), (side, side))  # not what the file holds
        elsewhere = path.rename(tmp_path / "elsewhere.dcm")
        older_release = Celery("older-release", broker=redis_url)
        png = base64.b64encode(cv2.imencode(".png", stale)[1].tobytes()).decode("ascii")  # an earlier payload
        older_release.send_task("pneumoscreen.infer", args=[instance_id, png],
                                queue="inference", serializer="json")
        older_release.close()
        _start_inference_until_sent_back(env, sessions, broker, processes, tmp_path)
        elsewhere.rename(path)
        row = _preprocess_until_final(env, sessions, processes, tmp_path)
    expected = model.predict(prepare(display_image(dcmread(path)), side))[0]
    assert row["state"] == InstanceState.PREDICTED.value, row["reason"]
    assert row["probability"] == pytest.approx(expected, abs=1e-5)
    assert abs(model.predict(stale)[0] - expected) > 1e-3  # the stale tensor would have scored otherwise


def _queued_kwargs(broker: redis.Redis, queue: str) -> list[dict]:
    """The keyword arguments of the task messages waiting in ``queue`` (Celery's JSON protocol 2)."""
    def body(envelope: dict):
        encoded = envelope["properties"].get("body_encoding") == "base64"
        return json.loads(base64.b64decode(envelope["body"]) if encoded else envelope["body"])

    return [body(json.loads(raw))[1] for raw in broker.lrange(queue, 0, -1)]


@pytest.mark.slow
def test_an_image_prepared_at_another_size_goes_back_to_be_prepared_at_the_models(pg_url, redis_url, processes,
                                                                                 tmp_path):
    # A preprocess worker still configured with a model of another input size (a rollout in
    # progress) prepared the film at 96 px; the inference worker's model takes its card's size.
    # The instance goes back to the preprocess queue with the size to prepare at, then ends
    # PREDICTED with the score of the film prepared at that size, not FAILED.
    from model.preprocessing import PREPROCESSING_VERSION

    model = get_model()
    with _sent_back_rig(pg_url, redis_url, processes, tmp_path) as (env, sessions, broker, path, instance_id):
        small = pipeline.encode_prepared(prepare(display_image(dcmread(path)), 96))
        other_rollout = Celery("other-rollout", broker=redis_url)
        other_rollout.send_task("pneumoscreen.infer", args=[[instance_id], [small]],
                                kwargs={"preprocessing": PREPROCESSING_VERSION}, queue="inference", serializer="json")
        other_rollout.close()
        inference = _start_inference_until_sent_back(env, sessions, broker, processes, tmp_path)
        [kwargs] = _queued_kwargs(broker, "preprocess")
        assert kwargs["size"] == model.card.input_size != 96
        assert kwargs["expected_preprocessing"] == PREPROCESSING_VERSION
        assert "prepared at another size" in inference.log()
        row = _preprocess_until_final(env, sessions, processes, tmp_path)
    assert row["state"] == InstanceState.PREDICTED.value, row["reason"]
    expected = model.predict(prepare(display_image(dcmread(path)), model.card.input_size))[0]
    assert row["probability"] == pytest.approx(expected, abs=1e-5)


def test_a_preprocess_worker_of_another_version_fails_an_instance_sent_back_instead_of_looping(
        sessions, sqlite_url, tmp_path):
    from worker import runtime, tasks
    from worker.settings import Settings

    ds = write_chest_dicom(tmp_path / "a.dcm", PNEUMONIA_JPEG)
    instance_id = _receive(sessions, tmp_path / "a.dcm", ds)
    runtime.configure(Settings(database_url=sqlite_url, data_dir=tmp_path / "data"))
    try:
        tasks.preprocess(instance_id, expected_preprocessing="99")
    finally:
        runtime.configure(Settings())
    state, reason = _state(sessions)
    assert state == "FAILED"
    assert "expects preprocessing 99" in reason and "upgrade the workers together" in reason
    assert (tmp_path / "a.dcm").is_file()  # not the file's fault: it stays where it is


def test_an_element_whose_value_does_not_fit_its_vr_fails_the_instance_with_the_reason(sessions, tmp_path):
    """Found by the dataset fuzzer: BodyPartExamined sent as UL made preprocessing raise."""
    path = tmp_path / "a.dcm"
    ds = write_chest_dicom(path, PNEUMONIA_JPEG, sop_class="CR")
    data = path.read_bytes()
    assert data.count(b"\x18\x00\x15\x00CS") == 1
    path.write_bytes(data.replace(b"\x18\x00\x15\x00CS", b"\x18\x00\x15\x00UL"))
    assert pipeline.preprocess_instance(sessions, _receive(sessions, path, ds), policy=POLICY) is None
    state, why = _state(sessions)
    assert state == "FAILED" and "could not be read" in why and len(why) <= 510
