"""The ATNA audit trail: every message valid against the DICOM audit message schema (PS3.15
A.5.1, shipped as worker/audit/audit-message.rnc), RFC 5424 framing, the spool across a repository
that is down then up, and a scripted session (sign-in failure and success, C-STORE, a refused
association, C-FIND, an SR sent, an HL7 export) received by a syslog receiver in its own process,
over UDP and over TLS with client certificates."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

import worker.audit as audit
from dicom_io.scu import Peer, find_studies
from tests.helpers.dicom_factory import PNEUMONIA_JPEG, chest_dataset
from tests.helpers.pki import make_pki
from tests.helpers.processes import Process, cli_env, free_port, listening, wait_for_port, wait_until
from worker.audit import catalog
from worker.audit.messages import NODE_AUTHENTICATION, AuditSource, Outcome, Participant
from worker.audit.sink import BOM, Repository, SyslogSender, octet_counted, syslog_message
from worker.audit.spool import DROPPED, AuditSpool
from worker.delivery.engine import report_outcome
from worker.settings import Settings

SCHEMA_FILE = Path(audit.__file__).with_name("audit-message.rnc")
HEADER = re.compile(rb"^<85>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ pneumoscreen \d+ IHE\+RFC-3881 - ")
TOKEN = "audit-test-token-0123456789"
SOURCE = AuditSource("PNEUMOSCREEN", "TESTSITE")
US = Participant("PNEUMOSCREEN", False, NetworkAccessPointID="scanner-host")
PACS = Participant("PACS", True, NetworkAccessPointID="10.1.2.3", AlternativeUserID="AETITLES=PACS")


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    # rnc2rng takes the standard's "##" documentation comments only where RELAX NG allows annotations;
    # as plain comments they say the same
    return etree.RelaxNG.from_rnc_string(SCHEMA_FILE.read_text().replace("##", "#"))


def _xml(message: bytes) -> etree._Element:
    """The AuditMessage of one RFC 5424 syslog message, after checking its header."""
    assert HEADER.match(message), message[:120]
    head, _, body = message.partition(BOM)
    assert head.endswith(b" - ")
    return etree.fromstring(body)


def _event(root: etree._Element) -> tuple[str, str | None, str, str]:
    ident = root.find("EventIdentification")
    type_code = ident.find("EventTypeCode")
    return (ident.find("EventID").get("csd-code"), None if type_code is None else type_code.get("csd-code"),
            ident.get("EventActionCode"), ident.get("EventOutcomeIndicator"))


def test_every_event_pneumoscreen_reports_is_valid_against_the_dicom_schema(schema):
    messages = [
        catalog.application_activity(SOURCE, started=True, application=US, launcher="root"),
        catalog.application_activity(SOURCE, started=False, application=US),
        catalog.instances_transferred(SOURCE, action="C", outcome=Outcome.SUCCESS, sender=PACS, receiver=US,
                                      StudyInstanceUID="1.2.3.4", sop_classes={"1.2.840.10008.5.1.4.1.1.1": 2},
                                      PatientID="PID-7"),
        catalog.instances_transferred(SOURCE, action="R", outcome=Outcome.SERIOUS_FAILURE, sender=US, receiver=PACS,
                                      StudyInstanceUID="1.2.3.4", sop_classes={}, PatientID=None,
                                      description="0xA700 out of resources <&>"),
        catalog.query(SOURCE, outcome=Outcome.SUCCESS, requestor=US, responder=PACS,
                      SOPClassUID=StudyRootQueryRetrieveInformationModelFind, identifier=b"\x08\x00\x52\x00",
                      TransferSyntaxUID=ExplicitVRLittleEndian),
        catalog.user_authentication(SOURCE, succeeded=False, user=Participant("web:anonymous", True,
                                                                              NetworkAccessPointID="10.0.0.9"),
                                    node=US, description="not the token"),
        catalog.security_alert(SOURCE, alert=NODE_AUTHENTICATION, reporter=US, subject="10.0.0.9",
                               subject_is_node=True, performer=PACS, description="calling AE title not recognised"),
        catalog.export(SOURCE, outcome=Outcome.SUCCESS, exporter=US,
                       destination=Participant("mllp://ris:2575", False), StudyInstanceUID="1.2.3.4"),
    ]
    for message in messages:
        root = etree.fromstring(message)
        assert schema.validate(root), (schema.error_log, message.decode())
    # a message that breaks the schema is caught by it: the check can fail
    broken = etree.fromstring(messages[0])
    broken.remove(broken.find("AuditSourceIdentification"))
    assert not schema.validate(broken)
    # text is escaped by the library, never spliced in
    assert etree.fromstring(messages[3]).find("EventIdentification/EventOutcomeDescription").text == \
        "0xA700 out of resources <&>"


def test_syslog_framing_is_rfc5424_with_a_bom_and_octet_counting():
    message = syslog_message(b"<AuditMessage/>", hostname="host with space", procid="42")
    assert message.startswith(b"<85>1 ") and b" hostwithspace pneumoscreen 42 IHE+RFC-3881 - " + BOM in message
    assert octet_counted(message) == str(len(message)).encode() + b" " + message
    with pytest.raises(ValueError, match="udp://, tcp:// or tls://host:port"):
        Repository.parse("syslog://host:514")
    with pytest.raises(ValueError, match="PNEUMOSCREEN_AUDIT_SYSLOG"):
        Settings(_env_file=None, audit_syslog="udp://host")


class Receiver:
    """tests/helpers/syslog_receiver.py in a process of its own; what it received, in order."""

    def __init__(self, tmp_path: Path, transport: str, *, port: int = 0, pki: Path | None = None) -> None:
        self.out = tmp_path / f"received-{transport}-{port}"
        args = [sys.executable, "-m", "tests.helpers.syslog_receiver", "--transport", transport, "--port", str(port),
                "--out", str(self.out)]
        if pki is not None:
            args += ["--cert", str(pki / "server.crt"), "--key", str(pki / "server.key"),
                     "--client-ca", str(pki / "ca.crt")]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING"), line
        self.port = int(line.split()[1])

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.out.glob("*.syslog"))]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.slow
def test_the_spool_keeps_messages_while_the_repository_is_down_and_reports_what_it_dropped(tmp_path, schema):
    port = free_port()
    sender = SyslogSender(Repository("tcp", "127.0.0.1", port), timeout=2)
    report = []

    def report_drops(n: int) -> bytes:
        report.append(n)
        return syslog_message(catalog.security_alert(SOURCE, alert=NODE_AUTHENTICATION, reporter=US, subject="spool",
                                                     description=f"{n} dropped"))

    dropped_before = DROPPED._value.get()
    spool = AuditSpool(tmp_path / "audit", max_messages=10, send=sender.send, report_drops=report_drops,
                       min_backoff=0.1, max_backoff=0.5)
    sent = [syslog_message(catalog.application_activity(SOURCE, started=True,
                                                        application=Participant(f"app {i}", False)))
            for i in range(12)]
    try:
        kept = [spool.put(m) for m in sent]
        assert kept == [True] * 10 + [False] * 2
        assert DROPPED._value.get() - dropped_before == 2
        time.sleep(0.5)  # the sender tries, fails, backs off: nothing is lost meanwhile
        assert spool.pending == 10 and len(list(spool.folder.glob("*.msg"))) == 10
        receiver = Receiver(tmp_path, "tcp", port=port)
        try:
            assert spool.flush(15), f"{spool.pending} messages still on disk"
            wait_until(lambda: len(receiver.messages()) == 11, timeout=10, what="11 messages received")
            received = receiver.messages()
        finally:
            receiver.stop()
    finally:
        spool.close()
    assert received[:10] == sent[:10]  # every one kept, in order
    assert report == [2] and b"2 dropped" in received[10]
    assert all(schema.validate(_xml(m)) for m in received)
    assert (spool.folder / "dropped").read_text().split() == ["2", "0"]


def _find_scp(port: int) -> tuple[AE, object]:
    def on_find(event):
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.826.0.1.3680043.10.511.9"
        match.StudyDate = "20240301"
        match.ModalitiesInStudy = event.identifier.ModalitiesInStudy
        yield 0xFF00, match

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    return ae, server


def _sign_in(api: str, token: str) -> int:
    with httpx.Client(base_url=api, timeout=10, follow_redirects=False) as client:
        form = client.get("/web/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        return client.post("/web/login", data={"token": token, "csrf_token": csrf, "next": "/web/worklist"}).status_code


def _scripted_session(tmp_path: Path, repository: dict[str, str], processes: list) -> Dataset:
    """What an imaging node's day holds, each a real exchange with a real peer."""
    with listening(tmp_path / "listen", "memory://", allowed_aes="MODALITY", **repository) as (port, _, data_dir):
        api_port = free_port()
        env = cli_env(data_dir=data_dir, api_token=TOKEN, api_port=api_port, broker_url="memory://", **repository)
        api = Process(["api"], env, tmp_path / "api.log")
        processes.append(api)
        wait_for_port(api_port, api.proc)
        assert _sign_in(f"http://127.0.0.1:{api_port}", "not-the-token-at-all") == 401
        assert _sign_in(f"http://127.0.0.1:{api_port}", TOKEN) == 303
        wrong = httpx.get(f"http://127.0.0.1:{api_port}/worklist", headers={"Authorization": "Bearer wrong-token-0123"})
        assert wrong.status_code == 401
        modality = AE(ae_title="MODALITY")
        ds = chest_dataset(PNEUMONIA_JPEG)
        modality.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = modality.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN")
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(Verification)
        assert intruder.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN").is_rejected
        api.stop()
    # this process as the rescreen command and the result deliveries: C-FIND to a PACS, an SR sent, an HL7 export
    pacs_port = free_port()
    pacs, server = _find_scp(pacs_port)
    settings = Settings(_env_file=None, data_dir=tmp_path / "cli", **{k.lower(): v for k, v in repository.items()})
    try:
        audit.start(settings, "rescreen")
        assert find_studies(Peer("PACS", "127.0.0.1", pacs_port), calling_ae="PNEUMOSCREEN", since=None, until=None,
                            modalities=("CR",))
        # as the delivery engine reports every delivery that ended, whatever its kind
        report_outcome("dicom", f"PACS@127.0.0.1:{pacs_port}", "1.2.826.0.1.3680043.10.511.9", "SENT", "1.2.3.4",
                       {"1.2.840.10008.5.1.4.1.1.88.34": 1})
        report_outcome("hl7", "127.0.0.1:2575", "1.2.826.0.1.3680043.10.511.9", "FAILED", "the RIS answered AE")
    finally:
        audit.stop()
        server.shutdown()
        pacs.shutdown()
    return ds


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["udp", "tls"])
def test_a_scripted_session_reaches_a_syslog_repository_as_schema_valid_audit_messages(
    transport, tmp_path, schema, processes
):
    pki = make_pki(tmp_path / "pki") if transport == "tls" else None
    receiver = Receiver(tmp_path, transport, pki=pki)
    repository = {"AUDIT_SYSLOG": f"{transport}://127.0.0.1:{receiver.port}"}
    if pki is not None:
        repository.update(AUDIT_TLS_CA=str(pki / "ca.crt"), AUDIT_TLS_CERT=str(pki / "client.crt"),
                          AUDIT_TLS_KEY=str(pki / "client.key"))
    try:
        ds = _scripted_session(tmp_path, repository, processes)
        wanted = {("110100", "110120"), ("110100", "110121"), ("110114", "110122"), ("110104", None),
                  ("110113", "110126"), ("110113", "110132"), ("110112", None), ("110106", None)}
        wait_until(lambda: wanted <= {_event(_xml(m))[:2] for m in receiver.messages()}, timeout=20,
                   what="every kind of event at the repository")
        received = [_xml(m) for m in receiver.messages()]
    finally:
        receiver.stop()
    for root in received:
        assert schema.validate(root), (schema.error_log, etree.tostring(root).decode())
    events = [_event(r) for r in received]
    assert ("110114", "110122", "E", "4") in events and ("110114", "110122", "E", "0") in events
    assert ("110113", "110126", "E", "4") in events
    assert ("110106", None, "R", "8") in events
    stored = [r for r in received if _event(r) == ("110104", None, "C", "0")]
    assert len(stored) == 1
    ids = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
           for o in stored[0].iter("ParticipantObjectIdentification")}
    assert ids == {"110180": ds.StudyInstanceUID, "2": ds.PatientID}
    sender = next(p for p in stored[0].iter("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110153")
    assert sender.get("UserID") == "MODALITY" and sender.get("NetworkAccessPointID") == "127.0.0.1"
    names = {str(ds.PatientName)} - {""}
    assert not any(name.encode() in etree.tostring(r) for r in received for name in names)  # no patient names
    sent = [r for r in received if _event(r) == ("110104", None, "R", "0")]
    assert len(sent) == 1 and next(sent[0].iter("SOPClass")).get("UID") == "1.2.840.10008.5.1.4.1.1.88.34"
    query = next(r for r in received if _event(r)[0] == "110112")
    assert query.find("ParticipantObjectIdentification").get("ParticipantObjectID") == \
        StudyRootQueryRetrieveInformationModelFind
