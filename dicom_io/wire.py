"""What a DICOM peer sends is bounded before it is read.

pynetdicom reads a PDU by trusting the length in its header and collects a
DIMSE message for as long as the peer sends fragments. Here every read is
bounded by what the state of the connection allows, for us as SCP and as SCU:

- before the association (awaiting an A-ASSOCIATE-RQ, -AC or -RJ): only those
  PDUs and A-ABORT, at most ``ASSOCIATION_PDU_BYTES``, read in steps so memory
  follows what actually arrived; the whole PDU by the association deadline;
- A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP and A-ABORT: exactly their fixed length;
- P-DATA-TF: at most the maximum PDU length we announced, received within the
  network timeout;
- a DIMSE command set: at most ``COMMAND_SET_BYTES``; a data set kept in
  memory (C-FIND identifiers, N-services) at most ``IN_MEMORY_DATASET_BYTES``;
  a C-STORE data set received into a file at most ``PeerBounds.stored_dataset_bytes``
  and never below the spool's free-space watermark.

A peer over a bound is aborted (A-ABORT, then the connection closed) once it is
associated, and simply disconnected before. Each refusal is one log line
(address and reason, no patient data), rate limited.

The bounds hold only on our own associations: ``BoundedAE`` (its requests and its
plain ``start_server``) and ``BoundedRequestHandler`` (the listener's connections)
give each association a ``BoundedDUL`` and a ``BoundedDIMSE``; pynetdicom's classes
are left as they are, for every other AE in the process. Those subclasses replace
private pynetdicom methods, so they are written for one minor series (``TESTED_SERIES``,
the pin in pyproject.toml); at import, ``PYNETDICOM_PROBLEMS`` lists what the installed
pynetdicom lacks of what they rely on, and a ``BoundedAE`` (so the listener) refuses
to be made while that list is not empty (``IncompatiblePynetdicomError``).
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pynetdicom
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

ASSOCIATION_PDU_BYTES = 1 << 20
"""A-ASSOCIATE-RQ/-AC: 128 presentation contexts offering every transfer syntax stay well below."""
COMMAND_SET_BYTES = 64 << 10
"""A DIMSE command set is a few hundred bytes."""
IN_MEMORY_DATASET_BYTES = 16 << 20
"""A data set that is not a C-STORE (a C-FIND identifier, an N-EVENT-REPORT)."""
UNANNOUNCED_PDU_BYTES = 16 << 20
"""P-DATA-TF bound where the local AE announced no maximum (0, unlimited)."""
_READ_STEP = 64 << 10
_SPACE_CHECK_STEP = 64 << 20

_FIXED_LENGTH = {0x03: 4, 0x05: 4, 0x06: 4, 0x07: 4}
_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
          0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
_BEFORE_ASSOCIATION = frozenset({"Sta1", "Sta2", "Sta3", "Sta4", "Sta5"})
_ALLOWED_BEFORE_ASSOCIATION = frozenset({0x01, 0x02, 0x03, 0x07})
# A-ABORT from the service provider (source 2): 1 unrecognized PDU, 2 unexpected PDU, 6 invalid PDU parameter value
_ABORT_UNRECOGNIZED, _ABORT_UNEXPECTED, _ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06


@dataclass(frozen=True)
class PeerBounds:
    """The per-AE bounds that are settings; an AE without ``peer_bounds`` gets the defaults."""

    stored_dataset_bytes: int = 2048 << 20
    """Largest data set a C-STORE may bring (received into a file)."""
    min_free_bytes: int = 0
    """Free space the file system receiving a data set keeps; a data set that would cross it is aborted."""

    def __post_init__(self) -> None:
        if self.stored_dataset_bytes < 1:
            raise ValueError(f"stored_dataset_bytes must be positive, got {self.stored_dataset_bytes}")
        if self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must not be negative, got {self.min_free_bytes}")


DEFAULT_BOUNDS = PeerBounds()


class Burst:
    """At most ``burst`` events per ``window`` seconds; ``allow()`` says whether this one may pass and
    ``suppressed()`` how many did not since the last that did."""

    def __init__(self, *, burst: int = 20, window: float = 10.0) -> None:
        self._burst, self._window = burst, window
        self._lock = threading.Lock()
        self._window_start, self._passed, self._held_back = 0.0, 0, 0

    def allow(self) -> tuple[bool, int]:
        """(whether this event passes, how many were held back before it when it does)."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self._window:
                self._window_start, self._passed = now, 0
            if self._passed >= self._burst:
                self._held_back += 1
                return False, 0
            self._passed += 1
            held_back, self._held_back = self._held_back, 0
            return True, held_back


class PeerLog:
    """One line per refused peer, at most ``burst`` per ``window`` seconds; the rest are counted
    and the count is logged with the next line let through."""

    def __init__(self, logger: logging.Logger, *, burst: int = 20, window: float = 10.0) -> None:
        self._log = logger
        self._limit = Burst(burst=burst, window=window)

    def refused(self, address: str, reason: str) -> None:
        allowed, held_back = self._limit.allow()
        if allowed:
            more = f" ({held_back} more refused peers not logged)" if held_back else ""
            self._log.warning("peer %s refused: %s%s", address, reason, more)


peer_log = PeerLog(log)


class PynetdicomNoise(logging.Filter):
    """pynetdicom logs what a malformed PDU made it fail on, often with a traceback, once per PDU:
    a peer sending garbage could fill the disk. Its errors are kept without their traceback, at
    most ``burst`` per ``window`` seconds; the refusal itself is our own rate-limited line."""

    def __init__(self, *, burst: int = 20, window: float = 10.0) -> None:
        super().__init__()
        self._limit = Burst(burst=burst, window=window)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom") or record.levelno < logging.ERROR:
            return True
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self._limit.allow()[0]


def bounds_of(assoc) -> PeerBounds:
    return getattr(assoc.ae, "peer_bounds", DEFAULT_BOUNDS)


def peer_address(assoc) -> str:
    """``host:port`` of the other side of ``assoc``."""
    info = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return f"{info.address}:{info.port}"
    except (AttributeError, TypeError, ValueError):  # pynetdicom raises ValueError where no address is set
        return "unknown peer"


def received_files(assoc) -> set[str]:
    """Files a C-STORE data set was received into on this association (removed by the handler
    once stored; what is left after the association ended was cut off)."""
    return assoc.__dict__.setdefault("_received_files", set())


def drop(dul: DULServiceProvider, reason: str, *, abort_reason: int | None = None) -> None:
    """Refuse the peer of ``dul``: log it, send an A-ABORT when ``abort_reason`` is given, close
    the connection. The state machine then sees the transport closed (Evt17) and ends."""
    peer_log.refused(peer_address(dul.assoc), reason)
    transport = dul.socket
    raw = transport.socket if transport is not None else None
    if raw is not None and abort_reason is not None:
        try:
            raw.settimeout(1.0)
            raw.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, abort_reason))
        except OSError:
            pass
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    connected = transport is not None and transport._is_connected
    if transport is not None:
        transport.close()  # queues Evt17 while it was connected
        if raw is not None:
            raw.close()
    if not connected:
        dul.event_queue.put("Evt17")


def _recv(raw: socket.socket, nr_bytes: int, deadline: float, *, step: int | None = None,
          prefix: bytes = b"") -> bytearray:
    """``prefix`` and then up to ``nr_bytes`` from ``raw``, stopping at ``deadline``
    (``time.monotonic()``) or when the peer closes. One buffer filled in place (a 2 MB image is
    some 8 recv() calls, not 500); with ``step``, it grows by at most that much ahead of what arrived."""
    nr_bytes += len(prefix)
    buffer = bytearray(nr_bytes if step is None else min(nr_bytes, max(step, len(prefix))))
    buffer[:len(prefix)] = prefix
    filled = len(prefix)
    previous = raw.gettimeout()
    try:
        raw.settimeout(max(deadline - time.monotonic(), 0.001))
        while filled < nr_bytes and time.monotonic() < deadline:
            if filled == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - filled)))
            with memoryview(buffer) as view:
                count = raw.recv_into(view[filled:], len(buffer) - filled)
            if not count:
                break
            filled += count
    except OSError:  # a timeout, a reset, or the socket closed under us
        pass
    finally:
        try:
            raw.settimeout(previous)
        except OSError:
            pass
    del buffer[filled:]
    return buffer


def _deadline(dul: DULServiceProvider, before_association: bool) -> float:
    assoc = dul.assoc
    if before_association:
        deadline = getattr(assoc, "association_deadline", None)
        if deadline is not None:
            return deadline
        return time.monotonic() + (assoc.acse_timeout or 30.0)
    return time.monotonic() + (assoc.network_timeout or 60.0)


def _p_data_limit(assoc) -> int:
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return local.maximum_length or UNANNOUNCED_PDU_BYTES


class BoundedDUL(DULServiceProvider):
    """pynetdicom's upper layer provider, reading each PDU within the bounds of its state."""

    def _read_pdu_data(self) -> None:
        """``DULServiceProvider._read_pdu_data`` with every length checked before it is read.

        Same contract: queue the event of the PDU received (Evt3/4/6/10/12/13/16), Evt19 for a
        PDU that does not decode, Evt17 when the connection is gone.
        """
        read_pdu(self)


def read_pdu(dul: DULServiceProvider) -> None:
    """What ``BoundedDUL._read_pdu_data`` does, for ``dul``."""
    transport = dul.socket
    raw = transport.socket if transport is not None else None
    if raw is None:
        dul.event_queue.put("Evt17")
        return
    before = dul.state_machine.current_state in _BEFORE_ASSOCIATION
    deadline = _deadline(dul, before)
    header = _recv(raw, 6, deadline)
    if len(header) < 6:
        if header:
            drop(dul, f"connection closed or timed out within a PDU header ({len(header)} of 6 bytes)")
        else:  # the peer closed the connection
            connected = transport._is_connected
            transport.close()
            if not connected:
                dul.event_queue.put("Evt17")
        return

    pdu_type, _, length = struct.unpack(">BBL", header)
    name = _NAMES.get(pdu_type)
    abort = None if before else _ABORT_INVALID_PARAMETER
    if name is None:
        drop(dul, f"unknown PDU type 0x{pdu_type:02X}", abort_reason=None if before else _ABORT_UNRECOGNIZED)
        return
    if before and pdu_type not in _ALLOWED_BEFORE_ASSOCIATION:
        drop(dul, f"{name} before an association")
        return
    fixed = _FIXED_LENGTH.get(pdu_type)
    limit = fixed or (ASSOCIATION_PDU_BYTES if pdu_type in (0x01, 0x02) else _p_data_limit(dul.assoc))
    if (fixed is not None and length != fixed) or length > limit:
        expected = f"{fixed} bytes" if fixed is not None else f"at most {limit}"
        drop(dul, f"{name} of {length} bytes ({expected})", abort_reason=abort)
        return

    pdu_bytes = _recv(raw, length, deadline, step=_READ_STEP if before else None, prefix=bytes(header))
    if len(pdu_bytes) < 6 + length:
        drop(dul, f"{name} cut off or too slow: {len(pdu_bytes) - 6} of {length} bytes by the deadline",
             abort_reason=abort)
        return
    try:
        pdu, event = dul._decode_pdu(pdu_bytes)
        if pdu_type in (0x01, 0x02):
            # pynetdicom checks some fields (an even presentation context ID...) only when the state
            # machine builds the primitive, in its reactor thread, which such an error would end
            pdu.to_primitive()
    except Exception as exc:  # pynetdicom's decoders raise many types on a malformed PDU
        peer_log.refused(peer_address(dul.assoc), f"{name} does not decode ({type(exc).__name__})")
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _fragment_bytes(primitive) -> tuple[int, int]:
    command = dataset = 0
    for _, data in primitive.presentation_data_value_list or ():
        if not data:
            continue
        if data[0] & 1:
            command += len(data) - 1
        else:
            dataset += len(data) - 1
    return command, dataset


def _over_bounds(message: DIMSEMessage, assoc, command: int, dataset: int) -> str | None:
    """Why adding these fragments to ``message`` would cross a bound, or None."""
    if command and message.encoded_command_set.tell() + command > COMMAND_SET_BYTES:
        return f"DIMSE command set over {COMMAND_SET_BYTES} bytes"
    if not dataset:
        return None
    stored = message._data_set_file
    if stored is None:
        size = message.data_set.tell()
        return (f"data set kept in memory over {IN_MEMORY_DATASET_BYTES} bytes"
                if size + dataset > IN_MEMORY_DATASET_BYTES else None)
    bounds = bounds_of(assoc)
    size = stored.tell()
    if size + dataset > bounds.stored_dataset_bytes:
        return f"C-STORE data set over {bounds.stored_dataset_bytes >> 20} MB"
    if bounds.min_free_bytes and (size + dataset) // _SPACE_CHECK_STEP != size // _SPACE_CHECK_STEP:
        stat = os.statvfs(Path(stored.name).parent)
        if stat.f_bavail * stat.f_frsize - dataset < bounds.min_free_bytes:
            return "C-STORE data set would fill the spool below its free-space watermark"
    return None


class BoundedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with the size of the message being collected bounded as each
    fragment arrives; a C-STORE data set's file is remembered on the association, so that one cut
    off can be removed. (Not a DIMSEMessage subclass: pynetdicom turns a message into its C-STORE-RQ,
    C-FIND-RSP... class once the command set is decoded.)"""

    def receive_primitive(self, primitive) -> None:
        if self.message is None:  # what pynetdicom's own receive_primitive would start with
            self.message = DIMSEMessage()
        message = self.message
        reason = _over_bounds(message, self.assoc, *_fragment_bytes(primitive))
        if reason is not None:
            drop(self.assoc.dul, reason, abort_reason=_ABORT_INVALID_PARAMETER)
            return
        super().receive_primitive(primitive)
        if message._data_set_file is not None:
            received_files(self.assoc).add(message._data_set_file.name)


def discard_cut_off(assoc) -> int:
    """After ``assoc`` ended: close and remove the files of data sets it did not finish (or whose
    handler never ran). Returns how many were removed."""
    message = getattr(assoc.dimse, "message", None)
    stored = getattr(message, "_data_set_file", None)
    if stored is not None:
        try:
            stored.close()
        except OSError:
            pass
    removed = 0
    for name in received_files(assoc):
        path = Path(name)
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("could not remove a cut-off data set %s: %s", path.name, exc)
    received_files(assoc).clear()
    return removed



def bound(assoc: Association) -> Association:
    """``assoc``, not yet started, with a ``BoundedDUL`` and a ``BoundedDIMSE`` in place of pynetdicom's
    providers; what was already queued on it (an acceptor's Evt5) stays queued."""
    old = assoc.dul
    if old.is_alive():
        raise RuntimeError("the bounds are given to an association before it starts")
    dul = BoundedDUL(assoc)
    dul.socket = old.socket
    dul.event_queue, dul.to_provider_queue = old.event_queue, old.to_provider_queue
    dul.to_user_queue, dul._recv_pdu = old.to_user_queue, old._recv_pdu
    assoc.dul, assoc.dimse = dul, BoundedDIMSE(assoc)
    # the ARTIM and idle timers belong to the DUL: set the association's timeouts on the new one
    assoc.acse_timeout, assoc.network_timeout = assoc.acse_timeout, assoc.network_timeout
    return assoc


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's connection handler, whose association is bounded."""

    def _create_association(self) -> Association:
        return bound(super()._create_association())


TESTED_SERIES = (3, 0)
"""The pynetdicom minor series the subclasses above were written and tested for (pinned in pyproject.toml)."""


class IncompatiblePynetdicomError(RuntimeError):
    """The installed pynetdicom lacks what the bounds rely on: no ``BoundedAE``, so no listener, without them."""


# what the subclasses replace or call: (class, attribute, its parameters)
_RELIED_ON = (
    (DULServiceProvider, "_read_pdu_data", ("self",)),
    (DULServiceProvider, "_decode_pdu", ("self", "bytestream")),
    (DIMSEServiceProvider, "receive_primitive", ("self", "primitive")),
    (RequestHandler, "_create_association", ("self",)),
    (AE, "_create_socket", ("self", "assoc", "address", "tls_args")),
)
_INSTANCE_ATTRIBUTES = {
    "DULServiceProvider": ("socket", "event_queue", "to_provider_queue", "to_user_queue", "_recv_pdu",
                           "state_machine", "artim_timer", "_idle_timer"),
    "DIMSEServiceProvider": ("message", "msg_queue"),
    "DIMSEMessage": ("encoded_command_set", "data_set", "_data_set_file"),
    "AssociationSocket": ("socket", "_is_connected"),
}


def _missing_on_instances() -> list[str]:
    """The instance attributes of ``_INSTANCE_ATTRIBUTES`` that pynetdicom's objects lack once made."""
    assoc = Association(AE(), "acceptor")
    ours, theirs = socket.socketpair()
    try:
        instances = {"DULServiceProvider": assoc.dul, "DIMSEServiceProvider": assoc.dimse,
                     "DIMSEMessage": DIMSEMessage(),
                     "AssociationSocket": AssociationSocket(assoc, client_socket=ours)}
    finally:
        ours.close()
        theirs.close()
    return [f"{kind}.{name} is gone" for kind, names in _INSTANCE_ATTRIBUTES.items()
            for name in names if not hasattr(instances[kind], name)]


def pynetdicom_problems() -> list[str]:
    """What the installed pynetdicom lacks of what ``BoundedDUL``, ``BoundedDIMSE``, ``BoundedRequestHandler``
    and ``BoundedAE`` rely on; empty when it has all of it."""
    problems = []
    try:
        series = tuple(int(part) for part in pynetdicom.__version__.split(".")[:2])
    except ValueError:
        series = ()
    if series != TESTED_SERIES:
        problems.append(f"version {pynetdicom.__version__} is not {TESTED_SERIES[0]}.{TESTED_SERIES[1]}.x")
    for owner, name, parameters in _RELIED_ON:
        attribute = getattr(owner, name, None)
        if not callable(attribute):
            problems.append(f"{owner.__name__}.{name} is gone")
            continue
        found = tuple(inspect.signature(attribute).parameters)
        if found != parameters:
            problems.append(f"{owner.__name__}.{name} takes ({', '.join(found)}), not ({', '.join(parameters)})")
    for name in ("acse_timeout", "network_timeout"):
        if getattr(getattr(Association, name, None), "fset", None) is None:
            problems.append(f"Association.{name} is no longer a settable property")
    try:
        problems += _missing_on_instances()
    except Exception as exc:  # any failure here means these internals changed: report it, do not crash the import
        problems.append(f"its association objects cannot be made as before ({type(exc).__name__}: {exc})")
    return problems


PYNETDICOM_PROBLEMS: tuple[str, ...] = tuple(pynetdicom_problems())
"""Found at import; a ``BoundedAE`` refuses to be made while it is not empty."""


def require_compatible_pynetdicom(problems: tuple[str, ...] | list[str] | None = None) -> None:
    """Raise ``IncompatiblePynetdicomError`` naming each problem (by default those found at import)."""
    problems = PYNETDICOM_PROBLEMS if problems is None else problems
    if problems:
        raise IncompatiblePynetdicomError(
            f"the installed pynetdicom {pynetdicom.__version__} is not the one the bounds on DICOM peers were "
            f"written for ({TESTED_SERIES[0]}.{TESTED_SERIES[1]}.x): {'; '.join(problems)}. "
            "Install the pynetdicom version pinned in pyproject.toml.")


class BoundedAE(AE):
    """A pynetdicom AE whose own associations are bounded: those it requests, and those accepted by
    ``start_server``/``make_server`` (a server class that makes its own handlers uses
    ``BoundedRequestHandler``). Refuses to be made while ``PYNETDICOM_PROBLEMS`` is not empty."""

    def __init__(self, ae_title: str = "PYNETDICOM") -> None:
        require_compatible_pynetdicom()
        super().__init__(ae_title=ae_title)

    def _create_socket(self, assoc, address, tls_args):
        # AE.associate makes the association, then its socket, then starts it: the one moment to bound it
        return super()._create_socket(bound(assoc), address, tls_args)

    def make_server(self, address, ae_title=None, contexts=None, ssl_context=None, evt_handlers=None,
                    server_class=None, **kwargs):
        kwargs.setdefault("request_handler", BoundedRequestHandler)
        return super().make_server(address, ae_title, contexts, ssl_context, evt_handlers, server_class, **kwargs)
