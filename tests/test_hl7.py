"""HL7 v2.5.1 with the RIS, against a real MLLP peer (tests/helpers/ris.py, python-hl7's asyncio server,
in its own process):

- the ORU^R01 of a screened study: what it carries, valid against the 2.5.1 structure (hl7apy, strict),
  its control ID derived from its content;
- delivered through the one delivery path: AE then AA, a correction (result status C) when another model
  version's result was sent before, FAILED with the RIS's words;
- end to end on the production topology: a film sent by C-STORE reaches the RIS once after one AE, and a
  worker killed while the RIS holds its ACK loses and duplicates nothing (one control ID per content);
- the RIS's final reports as verdicts through the MLLP listener: matched, unmatched, malformed, ACKs.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import hl7
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.deliveries import DeliveryJob, EarlierDelivery, ScreenedImage, list_deliveries
from tests.helpers.dicom_factory import NORMAL_JPEG, PLANTED_PATIENT_ID, PNEUMONIA_JPEG, chest_dataset
from tests.helpers.records import answer, model_card, receive
from tests.helpers.ris import REFUSAL, RisPeer
from worker import delivery
from worker.delivery import SendError
from worker.delivery.hl7 import Hl7Destination
from worker.hl7.oru import Parties, Patient, build_oru, validate_oru

PARTIES = Parties(sending_application="PNEUMOSCREEN", sending_facility="RADIOLOGY", receiving_application="RIS",
                  receiving_facility="HOSPITAL", patient_id_authority="HOSP")


def _job(*probabilities: float, earlier=(), accession: str | None = "ACC-17", threshold: float = 0.5) -> DeliveryJob:
    images = tuple(ScreenedImage(f"1.2.826.0.1.3680043.10.9.{n}", "/unused", p, p >= threshold, threshold,
                                 "pneumoscreen-cnn", "ab" * 32) for n, p in enumerate(probabilities))
    return DeliveryJob(7, "1.2.826.0.1.3680043.10.9", "0.6.0", "hl7", "ris:2575", 1, images,
                       AccessionNumber=accession, earlier=tuple(earlier))


PATIENT = Patient("PID-1|2", "", "Doe^Jane", "F", "20261103101500")


def _obx(message: hl7.Message) -> dict[str, hl7.Segment]:
    return {str(obx(3)(1)(1)): obx for obx in message.segments("OBX")}


def test_the_oru_carries_the_order_patient_priority_result_and_model_and_is_valid_2_5_1():
    oru = build_oru(_job(0.91, 0.2), PARTIES, patient=PATIENT, now=datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc))
    assert validate_oru(oru.er7).name == "ORU_R01"
    message = hl7.parse(oru.er7)
    msh, pid, orc, obr = (message.segment(name) for name in ("MSH", "PID", "ORC", "OBR"))
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(6))) == ("PNEUMOSCREEN", "RADIOLOGY", "RIS", "HOSPITAL")
    assert (str(msh(7)), str(msh(9)), str(msh(10)), str(msh(12))) == (
        "20261203090000+0000", "ORU^R01^ORU_R01", oru.control_id, "2.5.1")
    assert message.unescape(str(pid(3)(1)(1))) == "PID-1|2" and str(pid(3)(1)(4)) == "HOSP"
    assert str(pid(5)) == "Doe^Jane" and str(pid(8)) == "F"
    assert str(orc(3)) == str(obr(3)) == str(obr(18)) == "ACC-17"
    assert (str(obr(5)), str(obr(7)), str(obr(25))) == ("S", "20261103101500", "P")
    assert str(message.segment("TQ1")(9)(1)(1)) == "S"
    obx = _obx(message)
    assert str(obx["110180"](5)) == "1.2.826.0.1.3680043.10.9"
    assert (str(obx["FLAG"](2)), str(obx["FLAG"](5)(1)(1)), str(obx["FLAG"](8))) == ("CWE", "POS", "A")
    assert (str(obx["PROB"](2)), float(str(obx["PROB"](5)))) == ("NM", 0.91)
    assert float(str(obx["THRESH"](5))) == 0.5
    assert "pneumoscreen-cnn 0.6.0" in str(obx["DEVICE"](5))
    assert {str(o(11)) for o in obx.values()} == {"P"}
    assert "not a diagnosis" in str(message.segment("NTE")(3))


def test_a_normal_study_is_routine_and_not_suspected():
    message = hl7.parse(build_oru(_job(0.1, 0.2), PARTIES, patient=PATIENT).er7)
    assert str(message.segment("OBR")(5)) == "R" and str(message.segment("TQ1")(9)(1)(1)) == "R"
    assert (str(_obx(message)["FLAG"](5)(1)(1)), str(_obx(message)["FLAG"](8))) == ("NEG", "N")


def test_the_control_id_follows_the_content_not_the_time_of_sending():
    first = build_oru(_job(0.91), PARTIES, patient=PATIENT, now=datetime(2026, 12, 3, tzinfo=timezone.utc))
    again = build_oru(_job(0.91), PARTIES, patient=PATIENT, now=datetime(2026, 12, 4, tzinfo=timezone.utc))
    other = build_oru(_job(0.92), PARTIES, patient=PATIENT)
    corrected = build_oru(_job(0.91, earlier=[EarlierDelivery("0.5.0", "abc MSA|AA|abc", False)]), PARTIES,
                          patient=PATIENT)
    assert first.control_id == again.control_id and first.er7 != again.er7
    assert len({first.control_id, other.control_id, corrected.control_id}) == 3
    assert len(first.control_id) == 20


def test_a_film_without_a_patient_id_cannot_be_built(tmp_path):
    ds = chest_dataset(NORMAL_JPEG, transfer_syntax=ExplicitVRLittleEndian)
    ds.PatientID = ""
    ds.save_as(tmp_path / "film.dcm", enforce_file_format=True)
    job = _job(0.3)
    job = DeliveryJob(**{**job.__dict__, "images": (ScreenedImage(**{**job.images[0].__dict__,
                                                                      "path": str(tmp_path / "film.dcm")}),)})
    with pytest.raises(ValueError, match="no PatientID"):
        build_oru(job, PARTIES)


# --- through the delivery path, to a real MLLP peer -------------------------------------------------------

@pytest.fixture
def films(tmp_path) -> list[Path]:
    study = generate_uid()
    paths = []
    for n, jpeg in enumerate((PNEUMONIA_JPEG, NORMAL_JPEG)):
        ds = chest_dataset(jpeg, study_uid=study, transfer_syntax=ExplicitVRLittleEndian, accession="ACC-9")
        paths.append(tmp_path / f"film{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _screen(sessions, films: list[Path], probabilities: tuple[float, float], version: str) -> list[int]:
    from pydicom import dcmread

    study = dcmread(films[0], stop_before_pixels=True).StudyInstanceUID
    with sessions.begin() as s:
        ids = [receive(s, study, dcmread(p, stop_before_pixels=True).SOPInstanceUID, "ACC-9", path=str(p))[0]
               for p in films]
        answer(s, list(zip(ids, probabilities)), model_card(version))
    return ids


def _send(sessions, destination, delivery_id) -> str:
    resolve = lambda kind, address: destination  # noqa: E731
    for _ in range(3):
        try:
            return delivery.deliver(sessions, delivery_id, resolve)
        except SendError:
            continue
    raise AssertionError("not sent in three attempts")


@pytest.mark.slow
def test_the_ris_gets_the_result_after_an_ae_and_a_correction_when_a_new_version_changes_it(
        tmp_path, sessions, films):
    ris = RisPeer(tmp_path / "ris", answers="AE,AA")
    try:
        destination = Hl7Destination(ris.address, parties=PARTIES, timeout=10)
        ids = _screen(sessions, films, (0.9, 0.1), "1.0")
        [first] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0",
                                              destinations=[destination])
        with pytest.raises(SendError, match=REFUSAL):
            delivery.deliver(sessions, first, lambda kind, address: destination)
        assert _send(sessions, destination, first) == "sent"
        with sessions.begin() as s:
            answer(s, [(ids[0], 0.2), (ids[1], 0.1)], model_card("2.0"))
        [second] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="2.0",
                                               destinations=[destination])
        assert _send(sessions, destination, second) == "sent"
        received = ris.messages()
    finally:
        ris.stop()
    assert [m["answered"] for m in received] == ["AE", "AA", "AA"]
    original, retried, correction = (hl7.parse(m["message"]) for m in received)
    assert str(original.segment("MSH")(10)) == str(retried.segment("MSH")(10)), "a retry keeps the control ID"
    assert str(original).split("\r")[1:] == str(retried).split("\r")[1:], "and sends the same message"
    for message in (retried, correction):
        validate_oru(str(message))
        assert message.unescape(str(message.segment("PID")(3)(1)(1))) == PLANTED_PATIENT_ID
        assert str(message.segment("OBR")(18)) == "ACC-9"
    assert str(retried.segment("OBR")(25)) == "P" and str(retried.segment("OBR")(5)) == "S"
    assert str(correction.segment("OBR")(25)) == "C" and str(correction.segment("OBR")(5)) == "R"
    assert {str(obx(11)) for obx in correction.segments("OBX")} == {"C"}
    assert str(_obx(correction)["FLAG"](5)(1)(1)) == "NEG"
    first_id = str(retried.segment("MSH")(10))
    assert any(f"message {first_id}" in str(nte(3)) for nte in correction.segments("NTE"))
    with sessions.begin() as s:
        rows = {r["model_version"]: r for r in list_deliveries(s, study_instance_uid=str(
            _obx(correction)["110180"](5)))}
    assert rows["1.0"]["state"] == rows["2.0"]["state"] == "SENT"
    assert rows["1.0"]["receipt"].startswith(f"{first_id} MSA|AA|{first_id}")


@pytest.mark.slow
def test_a_ris_that_keeps_refusing_fails_the_delivery_with_its_words_and_one_that_is_down_is_retried(
        tmp_path, sessions, films):
    ids = _screen(sessions, films, (0.9, 0.1), "1.0")
    ris = RisPeer(tmp_path / "ris", answers="AR")
    try:
        destination = Hl7Destination(ris.address, parties=PARTIES, timeout=10)
        [delivery_id] = delivery.request_deliveries(sessions, instance_ids=ids, model_version="1.0",
                                                    destinations=[destination])
        with pytest.raises(SendError, match=f"AR .*{REFUSAL}") as refused:
            delivery.deliver(sessions, delivery_id, lambda kind, address: destination)
        assert refused.value.transient is False
    finally:
        ris.stop()
    delivery.give_up(sessions, delivery_id, f"gave up after 8 retries: {refused.value}")
    with sessions.begin() as s:
        [row] = list_deliveries(s)
    assert row["state"] == "FAILED" and REFUSAL in row["reason"]
    with pytest.raises(SendError, match="no connection") as down:
        Hl7Destination(ris.address, parties=PARTIES, timeout=2).send(build_oru(_job(0.9), PARTIES, patient=PATIENT))
    assert down.value.transient is True


# --- end to end: production topology (listener and worker processes, Redis, PostgreSQL) ------------------

def _hl7_rows(db_url: str) -> list[dict]:
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            return [r for r in list_deliveries(session) if r["kind"] == "hl7"]
    finally:
        engine.dispose()


def _film(folder: Path, jpeg: Path, study: str, kind: str) -> Path:
    ds = chest_dataset(jpeg, study_uid=study, transfer_syntax=ExplicitVRLittleEndian, sop_class=kind)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_a_film_sent_by_c_store_reaches_the_ris_once_after_one_ae(tmp_path, processes, production, pg_url):
    from model.artifact import read_card
    from tests.helpers.dicom_factory import PLANTED_PATIENT_NAME
    from tests.helpers.processes import cli_json, storescu, wait_until

    ris = RisPeer(tmp_path / "ris", answers="AE,AA")
    try:
        env, port, _, _ = production(study_quiet_seconds=0.5, hl7_destination=ris.address,
                                     hl7_receiving_facility="HOSPITAL")
        study = generate_uid()
        assert storescu(port, _film(tmp_path / "send", PNEUMONIA_JPEG, study, "CR"),
                        _film(tmp_path / "send", NORMAL_JPEG, study, "DX")).returncode == 0
        [row] = wait_until(lambda: [r for r in _hl7_rows(pg_url) if r["state"] == "SENT"] or None, timeout=150,
                           what="the ORU acknowledged AA")
        received = ris.messages()
    finally:
        ris.stop()
    assert [m["answered"] for m in received] == ["AE", "AA"]
    refused, accepted = (hl7.parse(m["message"]) for m in received)
    control_id = str(accepted.segment("MSH")(10))
    assert str(refused.segment("MSH")(10)) == control_id and row["receipt"].startswith(control_id)
    validate_oru(str(accepted))
    card = read_card()
    instances = cli_json("instances", env=env)
    probabilities = [i["probability"] for i in instances]
    flagged = max(probabilities) >= card.threshold
    obx = _obx(accepted)
    assert str(obx["110180"](5)) == study
    assert accepted.unescape(str(accepted.segment("PID")(3)(1)(1))) == PLANTED_PATIENT_ID
    assert str(accepted.segment("OBR")(18)) == "ACC0001" and str(accepted.segment("MSH")(6)) == "HOSPITAL"
    assert float(str(obx["PROB"](5))) == pytest.approx(max(probabilities), abs=1e-4)
    assert float(str(obx["THRESH"](5))) == pytest.approx(card.threshold, abs=1e-4)
    assert str(obx["FLAG"](5)(1)(1)) == ("POS" if flagged else "NEG")
    assert str(accepted.segment("OBR")(5)) == ("S" if flagged else "R")
    assert f"{card.name} {card.version}" in str(obx["DEVICE"](5))
    for p in processes:
        assert PLANTED_PATIENT_ID not in p.log() and PLANTED_PATIENT_NAME.split("^")[0] not in p.log()


@pytest.mark.slow
def test_a_sender_killed_while_the_ris_holds_its_ack_resends_the_same_message_once_restarted(
        tmp_path, processes, production, pg_url):
    from tests.helpers.processes import Process, storescu, wait_until

    ris = RisPeer(tmp_path / "ris", answers="AA", hold=120, hold_count=1)
    try:
        env, port, _, worker = production(study_quiet_seconds=0.5, hl7_destination=ris.address,
                                          results_claim_seconds=10, broker_visibility_timeout=10)
        assert storescu(port, _film(tmp_path / "send", PNEUMONIA_JPEG, generate_uid(), "CR")).returncode == 0
        wait_until(ris.messages, timeout=240, what="the ORU at the RIS")
        worker.proc.kill()  # SIGKILL while the RIS holds its acknowledgement
        worker.proc.wait(timeout=10)
        [row] = _hl7_rows(pg_url)
        assert row["state"] == "SENDING"
        # deliveries go by the maintenance queue: a worker of that queue alone starts without the model
        processes.append(Process(["worker", "--queues", "maintenance"], env, tmp_path / "worker-2.log"))
        [row] = wait_until(lambda: [r for r in _hl7_rows(pg_url) if r["state"] == "SENT"] or None, timeout=150,
                           what="the ORU sent again by the restarted worker")
        received = ris.messages()
    finally:
        ris.stop()
    control_ids = [str(hl7.parse(m["message"]).segment("MSH")(10)) for m in received]
    assert len(control_ids) == 2 and len(set(control_ids)) == 1, "one control ID per content"
    assert row["receipt"].startswith(control_ids[0]) and row["attempts"] == 2


# --- the RIS's final reports, read as verdicts -----------------------------------------------------------

def final_report(accession: str | None, *codes: str, status: str = "F", control_id: str = "RPT0001",
                 message_type: str = "ORU^R01^ORU_R01", application: str = "RIS") -> str:
    """A final report as a RIS sends it: its findings as CWE OBX values (``code^text^system``)."""
    obr_accession = accession or ""
    segments = [f"MSH|^~\\&|{application}|HOSPITAL|PNEUMOSCREEN|RADIOLOGY|20261203100000||{message_type}|{control_id}"
                "|P|2.5.1",
                "PID|1||PID-97531-PLANTED^^^HOSP^PI||Zyxwvut^Plantedname",
                f"ORC|RE||{obr_accession}",
                f"OBR|1||{obr_accession}|36643-5^XR Chest 2 Views^LN|||20261203093000|||||||||||{obr_accession}|||||||"
                f"{status}",
                "OBX|1|TX|59776-5^Findings^LN||Patchy consolidation of the right lower lobe.||||||F"]
    segments += [f"OBX|{n}|CWE|18782-3^Radiology Study observation^LN||{code}||||||F"
                 for n, code in enumerate(codes, start=2)]
    return "\r".join(segments) + "\r"


PNEUMONIA = "233604007^Pneumonia^SCT"
NORMAL = "17621005^Normal^SCT"


def _feed(sessions, text: str):
    from worker.hl7.report import CodeMap, receive_report

    return receive_report(sessions, text.encode(), codes=CodeMap.parse("SCT^233604007,RADLEX^RID5350", "SCT^17621005"),
                          allowed_senders=frozenset(), application="PNEUMOSCREEN", facility="RADIOLOGY")


def _kept(sessions) -> list[dict]:
    from db.hl7_reports import list_reports

    with sessions.begin() as s:
        return list_reports(s)


def test_a_final_report_is_recorded_as_the_study_verdict_and_acknowledged_aa(sessions):
    from db.verdicts import record_verdict, study_verdicts

    with sessions.begin() as s:
        receive(s, "1.2.3.1", "1.2.3.1.1", "ACC-71")
    answer = _feed(sessions, final_report("ACC-71", PNEUMONIA))
    ack = hl7.parse(answer.ack)
    assert (str(ack.segment("MSA")(1)), str(ack.segment("MSA")(2))) == ("AA", "RPT0001")
    assert str(ack.segment("MSH")(9)) == "ACK^R01^ACK" and str(ack.segment("MSH")(5)) == "RIS"
    with sessions.begin() as s:
        verdict = study_verdicts(s, study_instance_uid="1.2.3.1")["verdict"]
    assert (verdict["finding"], verdict["source"], verdict["actor"], verdict["reference"]) == (
        "pneumonia", "ris-report", "ris:RIS", "RPT0001")
    # the RIS sends it again (our ACK was lost): acknowledged, not recorded twice
    assert _feed(sessions, final_report("ACC-71", PNEUMONIA)).ack_code == "AA"
    with sessions.begin() as s:
        assert len(study_verdicts(s, study_instance_uid="1.2.3.1")["verdicts"]) == 1
        record_verdict(s, study_instance_uid="1.2.3.1", finding="normal", source="radiologist", actor="user:ada")
    _feed(sessions, final_report("ACC-71", PNEUMONIA, control_id="RPT0002"))
    with sessions.begin() as s:
        assert study_verdicts(s, study_instance_uid="1.2.3.1")["verdict"]["finding"] == "normal", \
            "a radiologist's verdict wins over a report's"
    assert [r["state"] for r in _kept(sessions)] == ["RECORDED", "IGNORED", "RECORDED"]


@pytest.mark.parametrize("text, code, state, error, words", [
    (final_report("ACC-404", PNEUMONIA), "AE", "UNMATCHED", "204", "no study received"),
    (final_report("ACC-72", "999^Atelectasis^L"), "AE", "UNREADABLE", "101", "no coded OBX value"),
    (final_report("ACC-72", PNEUMONIA, NORMAL), "AE", "UNREADABLE", "102", "both pneumonia and normal"),
    (final_report(None, PNEUMONIA), "AE", "UNREADABLE", "101", "no accession number"),
    (final_report("ACC-72", PNEUMONIA, status="P"), "AA", "IGNORED", None, "not a final report"),
    (final_report("ACC-72", PNEUMONIA, message_type="ADT^A01^ADT_A01"), "AR", "REJECTED", "200", "ORU^R01"),
    ("this is not HL7 at all", "AE", "UNREADABLE", "100", "not an HL7 v2 message"),
    (final_report("ACC-72", PNEUMONIA).replace("\rOBR|", "\rXXX|"), "AE", "UNREADABLE", "100", "no OBR segment"),
])
def test_a_report_that_cannot_be_recorded_is_kept_with_its_reason_and_answered_per_the_standard(
        sessions, text, code, state, error, words):
    from worker.hl7.ack import Ack

    with sessions.begin() as s:
        receive(s, "1.2.3.2", "1.2.3.2.1", "ACC-72")
    answer = _feed(sessions, text)
    ack = Ack.parse(answer.ack)
    assert (ack.code, answer.state.value) == (code, state) and words in ack.text
    if error:
        assert str(hl7.parse(answer.ack).segment("ERR")(3)(1)(1)) == error
    [kept] = _kept(sessions)
    assert (kept["state"], kept["ack_code"], words in kept["reason"]) == (state, code, True)
    from db.verdicts import study_verdicts

    with sessions.begin() as s:
        assert study_verdicts(s, study_instance_uid="1.2.3.2")["verdicts"] == []


@pytest.mark.slow
def test_the_listener_takes_final_reports_from_a_ris_matched_unmatched_and_malformed(tmp_path, redis_url):
    from db.hl7_reports import list_reports
    from db.session import make_engine, make_sessionmaker
    from db.verdicts import study_verdicts
    from tests.helpers.processes import free_port, listening, storescu
    from tests.helpers.ris import send_reports
    from worker.hl7.ack import Ack

    feed = free_port()
    with listening(tmp_path, redis_url, hl7_listen_port=feed) as (port, listener, data_dir):
        film = _film(tmp_path / "send", NORMAL_JPEG, generate_uid(), "CR")  # accession ACC0001
        assert storescu(port, film).returncode == 0
        reports = {name: tmp_path / f"{name}.hl7" for name in ("matched", "unmatched", "malformed")}
        reports["matched"].write_text(final_report("ACC0001", NORMAL, control_id="R1"))
        reports["unmatched"].write_text(final_report("ACC-NONE", PNEUMONIA, control_id="R2"))
        reports["malformed"].write_text(  # no OBR: not a report
            f"MSH|^~\\&|RIS|HOSPITAL|||20261203||ORU^R01|R3|P|2.5.1\rOBX|1|CWE|X||{NORMAL}\r")
        acks = [Ack.parse(a) for a in send_reports(feed, *reports.values())]
        log = listener.log()
    assert [(a.code, a.control_id) for a in acks] == [("AA", "R1"), ("AE", "R2"), ("AE", "R3")]
    engine = make_engine(f"sqlite:///{data_dir / 'pneumoscreen.db'}")
    try:
        with make_sessionmaker(engine).begin() as s:
            from pydicom import dcmread

            verdict = study_verdicts(s, study_instance_uid=dcmread(film).StudyInstanceUID)["verdict"]
            kept = {r["control_id"]: r for r in list_reports(s)}
    finally:
        engine.dispose()
    assert (verdict["finding"], verdict["source"]) == ("normal", "ris-report")
    assert {k: v["state"] for k, v in kept.items()} == {"R1": "RECORDED", "R2": "UNMATCHED", "R3": "UNREADABLE"}
    assert "HL7 report listener" in log and "Plantedname" not in log and PLANTED_PATIENT_ID not in log
