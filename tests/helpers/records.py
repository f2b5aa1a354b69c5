"""Rows a test needs in the database, written as the listener and the inference worker write
them: a received instance, a model's answer (flagged by the model card's rule)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from db.models import DeliveryState, Instance, InstanceState, Prediction, ResultDelivery, Series, Study, utcnow
from db.queries import record_predictions, record_received
from db.session import make_engine, make_sessionmaker
from model.artifact import ModelCard

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def receive(session: Session, study: str, sop: str, accession: str = "A1", study_date: str | None = "20261102",
            *, series: str | None = None, path: str | None = None) -> tuple[int, bool]:
    """A CR instance of ``study`` received from a PACS: (instance id, whether it is new)."""
    return record_received(
        session, StudyInstanceUID=study, SeriesInstanceUID=series or f"{study}.1", SOPInstanceUID=sop,
        SOPClassUID=CR_IMAGE_STORAGE, TransferSyntaxUID=EXPLICIT_VR_LITTLE_ENDIAN, AccessionNumber=accession,
        Modality="CR", path=path or f"/spool/{sop}.dcm", size_bytes=10, calling_ae="PACS", StudyDate=study_date,
    )


def receive_file(session: Session, path: Path, ds) -> int:
    """The instance of a DICOM file written for the test, received as the listener records it."""
    instance_id, _ = record_received(
        session, StudyInstanceUID=ds.StudyInstanceUID, SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID=ds.SOPInstanceUID, SOPClassUID=ds.SOPClassUID,
        TransferSyntaxUID=ds.file_meta.TransferSyntaxUID, AccessionNumber="A", Modality=ds.Modality,
        path=str(path), size_bytes=path.stat().st_size, calling_ae="T",
    )
    return instance_id


def delivery_rows(db_url: str) -> list[ResultDelivery]:
    """Every delivery row of the database at ``db_url`` (another process's), oldest first."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return list(session.scalars(select(ResultDelivery).order_by(ResultDelivery.id)))
    finally:
        engine.dispose()


def model_card(version: str = "1.0", *, threshold: float = 0.5, sha256: str = "0" * 64) -> ModelCard:
    return ModelCard(name="cnn", version=version, sha256=sha256, threshold=threshold, input_size=224,
                     preprocessing_version="2")


def answer(session: Session, results: list[tuple[int, float]], card: ModelCard | None = None) -> set[int]:
    """``card``'s answers, (instance id, probability) each, flagged by its rule; the ids answered anew."""
    card = card or model_card()
    return record_predictions(session, model_name=card.name, model_version=card.version,
                              weights_sha256=card.sha256, threshold=card.threshold,
                              results=[(i, p, card.flags(p)) for i, p in results])


def fill_answered_day(sessions, *, studies: int, missing: int, destination: str, version: str,
                      chunk: int = 5000) -> None:
    """A busy day in bulk: ``studies`` studies answered over the last 24 hours (one CR series of
    two PREDICTED images each, one prediction each), the report to ``destination`` SENT for all
    but ``missing`` of them, spread evenly. Ids are set, so the database must be empty."""
    now = utcnow()
    for start in range(0, studies, chunk):
        ids = range(start + 1, min(studies, start + chunk) + 1)
        at = {i: now - timedelta(seconds=(i * 86_000) // studies + 120) for i in ids}
        with sessions.begin() as s:
            s.execute(insert(Study), [{"id": i, "StudyInstanceUID": f"1.2.826.0.1.3680043.10.1.{i}",
                                       "received_at": at[i], "last_received_at": at[i]} for i in ids])
            s.execute(insert(Series), [{"id": i, "study_id": i, "SeriesInstanceUID": f"1.2.826.0.1.3680043.10.2.{i}",
                                        "Modality": "CR"} for i in ids])
            s.execute(insert(Instance), [
                {"id": 2 * i + j, "series_id": i, "SOPInstanceUID": f"1.2.826.0.1.3680043.10.3.{i}.{j}",
                 "SOPClassUID": CR_IMAGE_STORAGE, "TransferSyntaxUID": EXPLICIT_VR_LITTLE_ENDIAN,
                 "path": f"/spool/{i}.{j}.dcm", "size_bytes": 1_000_000, "state": InstanceState.PREDICTED,
                 "received_at": at[i], "updated_at": at[i]} for i in ids for j in (0, 1)])
            s.execute(insert(Prediction), [
                {"instance_id": 2 * i + j, "model_name": "pneumoscreen-cnn", "model_version": version,
                 "weights_sha256": "a" * 64, "probability": 0.5, "threshold": 0.7, "flagged": False,
                 "created_at": at[i]} for i in ids for j in (0, 1)])
            s.execute(insert(ResultDelivery), [
                {"study_id": i, "model_version": version, "destination": destination, "state": DeliveryState.SENT,
                 "attempts": 1, "instance_count": 2, "updated_at": at[i] + timedelta(seconds=5)}
                for i in ids if i % max(1, studies // max(1, missing)) != 0 or missing == 0])
