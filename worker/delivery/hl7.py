"""The RIS destination: the study's ORU^R01 (HL7 v2.5.1, :mod:`worker.hl7.oru`) sent over MLLP to
``PNEUMOSCREEN_HL7_DESTINATION`` (``host:port``).

AA is sent (the receipt is the control ID and the RIS's MSA); AE, AR, an acknowledgement of another
message, or none within ``PNEUMOSCREEN_RESULTS_TIMEOUT_SECONDS`` is a :class:`SendError` with the RIS's
own text, retried with backoff by the engine and finally FAILED with it. A retry sends the same message
under the same control ID (it is derived from the content).
"""

from __future__ import annotations

from db.deliveries import DeliveryJob
from worker.delivery.base import Destination, Receipt, SendError
from worker.hl7.ack import Ack
from worker.hl7.mllp import NoAnswer, exchange
from worker.hl7.oru import OruMessage, Parties, build_oru


class Hl7Destination(Destination):
    """A RIS that takes ORU^R01 over MLLP at ``host:port``."""

    kind = "hl7"

    def __init__(self, address: str, *, parties: Parties, timeout: float = 30.0) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} must look like host:port (the RIS's MLLP port)")
        self.host, self.port = host, int(port)
        self.parties = parties
        self.timeout = timeout

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def build(self, job: DeliveryJob) -> OruMessage:
        return build_oru(job, self.parties)

    def send(self, content: OruMessage) -> Receipt:
        try:
            answer = exchange(self.host, self.port, content.encoded(), timeout=self.timeout)
        except NoAnswer as exc:
            raise SendError(str(exc), transient=True) from exc
        try:
            ack = Ack.parse(answer)
        except ValueError as exc:
            raise SendError(f"the RIS at {self.address} answered no ACK: {exc}", transient=True) from exc
        if ack.control_id != content.control_id:
            raise SendError(f"the RIS acknowledged message {ack.control_id!r}, not {content.control_id!r} "
                            f"(MSA {ack.msa})", transient=True)
        if ack.code not in {"AA", "CA"}:
            words = ack.text or "no text"
            raise SendError(f"the RIS answered {ack.code} to message {content.control_id}: {words}",
                            transient=ack.code != "AR")
        kind = "correction" if content.corrected else "result"
        return Receipt(f"{content.control_id} {ack.msa}",
                       f"ORU^R01 {kind} {content.control_id} ({'flagged' if content.flagged else 'not flagged'}), "
                       f"{ack.code} from {self.address}")
