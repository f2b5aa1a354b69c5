"""The one delivery path (worker.delivery.engine), whatever the kind of destination: claim, build, send,
receipt kept, retried content keeps its identity, FAILED with the reason, outcome hooks, earlier results.

The destination here is the test's own kind (it writes the content to a folder, and can be told to refuse):
the real kinds (C-STORE to Orthanc, MLLP to a RIS, FHIR, STOW-RS) are tested against their peers in their
own test modules; this one checks what the engine guarantees for all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db.deliveries import DeliveryJob, list_deliveries
from db.models import DeliveryState
from tests.helpers.records import answer, model_card, receive
from worker import delivery
from worker.delivery import Destination, Receipt, SendError
from worker.delivery import engine


class FolderDestination(Destination):
    """Writes each delivery as a JSON file named by its content; refuses while ``refuse`` is set."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refuse: str | None = None
        self.broken = False

    @property
    def address(self) -> str:
        return str(self.root)

    def build(self, job: DeliveryJob) -> dict:
        if self.broken:
            raise ValueError("the source film cannot be read")
        return {"study": job.StudyInstanceUID, "version": job.model_version,
                "flagged": any(i.flagged for i in job.images), "corrects": [e.model_version for e in job.earlier]}

    def send(self, content: dict) -> Receipt:
        if self.refuse:
            raise SendError(self.refuse)
        name = f"{content['study']}-{content['version']}.json"
        (self.root / name).write_text(json.dumps(content))
        return Receipt(name, f"as {name}")


@pytest.fixture
def folder(tmp_path) -> FolderDestination:
    root = tmp_path / "out"
    root.mkdir()
    return FolderDestination(root)


def _screen(sessions, study: str, probability: float, version: str = "1.0") -> list[int]:
    with sessions.begin() as s:
        ids = [receive(s, study, f"{study}.{i}")[0] for i in range(2)]
        answer(s, [(ids[0], probability), (ids[1], 0.1)], model_card(version))
    return ids


def _rows(sessions, study: str) -> list[dict]:
    with sessions.begin() as s:
        return list_deliveries(s, study_instance_uid=study)


def test_a_delivery_is_sent_once_with_its_receipt_and_a_second_claim_sends_nothing(sessions, folder):
    ids = _screen(sessions, "1.7", 0.9)
    [delivery_id] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0", destinations=[folder])
    assert delivery.deliver(sessions, delivery_id, lambda kind, address: folder) == "sent"
    assert delivery.deliver(sessions, delivery_id, lambda kind, address: folder).startswith("not claimed")
    [row] = _rows(sessions, "1.7")
    assert (row["kind"], row["state"], row["receipt"], row["instance_count"]) == ("folder", "SENT", "1.7-1.0.json", 2)
    assert json.loads((folder.root / "1.7-1.0.json").read_text())["flagged"] is True


def test_a_refusal_releases_the_claim_with_the_peer_text_and_give_up_fails_it(sessions, folder):
    ids = _screen(sessions, "1.8", 0.2)
    [delivery_id] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0", destinations=[folder])
    folder.refuse = "AE: unknown order"
    with pytest.raises(SendError, match="unknown order"):
        delivery.deliver(sessions, delivery_id, lambda kind, address: folder)
    [row] = _rows(sessions, "1.8")
    assert (row["state"], row["reason"], row["attempts"]) == ("PENDING", "AE: unknown order", 1)
    heard = []
    hook = delivery.on_outcome(lambda *args: heard.append(args))
    try:
        delivery.give_up(sessions, delivery_id, "gave up after 8 retries: AE: unknown order")
    finally:
        engine._outcome_hooks.remove(hook)
    [row] = _rows(sessions, "1.8")
    assert row["state"] == DeliveryState.FAILED.value and "unknown order" in row["reason"]
    assert heard == [("folder", str(folder.root), "1.8", "FAILED", "gave up after 8 retries: AE: unknown order", {})]
    assert list(folder.root.iterdir()) == []


def test_content_that_cannot_be_built_fails_at_once_with_the_reason(sessions, folder):
    ids = _screen(sessions, "1.9", 0.9)
    [delivery_id] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0", destinations=[folder])
    folder.broken = True
    outcome = delivery.deliver(sessions, delivery_id, lambda kind, address: folder)
    assert "cannot be read" in outcome
    [row] = _rows(sessions, "1.9")
    assert row["state"] == "FAILED" and "ValueError: the source film cannot be read" in row["reason"]


def test_a_result_of_a_new_model_version_knows_what_it_corrects(sessions, folder):
    ids = _screen(sessions, "2.1", 0.9, version="1.0")
    resolve = lambda kind, address: folder  # noqa: E731
    [first] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0", destinations=[folder])
    delivery.deliver(sessions, first, resolve)
    with sessions.begin() as s:
        answer(s, [(ids[0], 0.2), (ids[1], 0.1)], model_card("2.0"))
    [second] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="2.0", destinations=[folder])
    assert second != first
    delivery.deliver(sessions, second, resolve)
    content = json.loads((folder.root / "2.1-2.0.json").read_text())
    assert content == {"study": "2.1", "version": "2.0", "flagged": False, "corrects": ["1.0"]}


def test_every_configured_kind_gets_its_own_row(sessions, folder, tmp_path):
    other = FolderDestination(tmp_path)
    ids = _screen(sessions, "2.2", 0.9)
    made = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0", destinations=[folder, other])
    assert len(set(made)) == 2
    assert delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0",
                                       destinations=[folder, other]) == made, "asking again reuses the rows"


def test_an_unknown_kind_is_named_in_the_error():
    from worker.settings import Settings

    with pytest.raises(ValueError, match="no destination of kind 'carrier-pigeon'"):
        delivery.destination_for("carrier-pigeon", "loft", Settings())
    assert str(delivery.destination_for("dicom", "PACS@pacs:104", Settings())) == "dicom:PACS@pacs:104"
