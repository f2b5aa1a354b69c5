"""Who gets a thread and an association slot, and when a connection is let go.

pynetdicom gives every TCP connection two threads and counts it against the
association limit from its first byte; a connection that never speaks holds
both until the ACSE timeout. Here:

- a new connection waits in the ``ConnectionGate``, without a thread, until its
  first bytes arrive; it must complete its association by the ARTIM deadline
  (accept + ``artim_timeout``), or it is closed;
- connections not yet associated (waiting or negotiating) have their own
  budget, ``capacity``; when it is full, the oldest of them is closed to let
  the new one in, so a flood of idle or slow connections cannot keep a
  well-behaved peer out;
- only a connection that has sent its A-ASSOCIATE-RQ counts against
  ``maximum_associations`` (``ListenerAE``), and its slot is free as soon as
  its association thread ends;
- a TLS handshake happens in the connection's own thread, by the same deadline,
  not in the accept loop;
- no single calling address and no single calling AE title holds more than ``max_host_share`` of the
  association slots (``ListenerAE.admit``: the A-ASSOCIATE-RQ beyond it is answered A-ASSOCIATE-RJ,
  transient, local limit exceeded), nor of the pending connections (``ConnectionGate.admit``: the
  host's own oldest pending connection is closed), so one host cannot lock out the others;
- every rejected association is published (``dicom_io.events.AssociationRefused``) for the audit trail;
- when an association ends, the files of data sets it did not finish are removed.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io import events
from dicom_io.wire import BoundedAE, BoundedRequestHandler, PeerBounds, discard_cut_off, peer_log

log = logging.getLogger(__name__)

_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
"""A-ASSOCIATE-RJ: rejected-transient, DUL service-provider (presentation related), local-limit-exceeded."""
_REJECT_REASONS = {
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x01, 0x01, 0x02): "application context name not supported",
    (0x02, 0x03, 0x02): "local limit exceeded",
    (0x02, 0x03, 0x01): "temporary congestion",
    (0x02, 0x02, 0x01): "user identity not verified",
}


def share_limit(share: float, slots: int) -> int:
    """How many of ``slots`` one host may hold with ``share`` of them (at least one)."""
    return max(1, int(share * slots))


class ListenerAE(BoundedAE):
    """An AE whose association limit counts only connections that asked for an association
    (its associations bounded by ``dicom_io.wire``)."""

    def __init__(self, ae_title: str, *, peer_bounds: PeerBounds, artim_timeout: float,
                 max_pending_connections: int, max_host_share: float = 0.5) -> None:
        if not 0 < max_host_share <= 1:
            raise ValueError(f"max_host_share must be in (0, 1], got {max_host_share}")
        if artim_timeout <= 0:
            raise ValueError(f"artim_timeout must be positive, got {artim_timeout}")
        if max_pending_connections < 1:
            raise ValueError(f"max_pending_connections must be at least 1, got {max_pending_connections}")
        super().__init__(ae_title=ae_title)
        self.peer_bounds = peer_bounds
        self.artim_timeout = artim_timeout
        self.max_pending_connections = max_pending_connections
        self.max_host_share = max_host_share
        self._admission = threading.Lock()
        self._admitted: dict[object, tuple[str | None, str]] = {}  # association -> (address, calling AE)

    def admit(self, assoc) -> str | None:
        """On its A-ASSOCIATE-RQ: None if ``assoc`` may go on to negotiate, else why not (its host or
        its calling AE title already holds its share of the association slots)."""
        address = assoc.requestor.address or None
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        limit = share_limit(self.max_host_share, self.maximum_associations)
        with self._admission:
            held = [a for a in self._admitted if a.is_alive() and not a.is_rejected]
            self._admitted = {a: self._admitted[a] for a in held}
            by_address = sum(1 for a in held if self._admitted[a][0] == address)
            by_title = sum(1 for a in held if self._admitted[a][1] == calling)
            if by_address >= limit:
                return f"{address} already holds {by_address} of {self.maximum_associations} association slots"
            if by_title >= limit:
                return f"calling AE {calling} already holds {by_title} of {self.maximum_associations} association slots"
            self._admitted[assoc] = (address, calling)
        return None

    def release(self, assoc) -> None:
        with self._admission:
            self._admitted.pop(assoc, None)

    @property
    def active_associations(self):
        """Association threads that received an A-ASSOCIATE-RQ (as acceptor) or are requestors."""
        return [a for a in super().active_associations
                if not (a.is_acceptor and a.requestor.primitive is None)]


class _Stage(Enum):
    WAITING = "waiting"
    """In the gate, no thread yet, nothing received."""
    NEGOTIATING = "negotiating"
    """In its own thread, not yet associated."""
    DONE = "done"
    """Associated, ended, evicted or expired: no longer pending."""


@dataclass(eq=False)
class PendingConnection:
    sock: socket.socket
    address: tuple
    deadline: float
    """``time.monotonic()`` by which the association must be complete."""
    stage: _Stage = field(default=_Stage.WAITING)

    @property
    def peer(self) -> str:
        return f"{self.address[0]}:{self.address[1]}" if len(self.address) >= 2 else str(self.address)


class ConnectionGate:
    """Connections not yet associated: at most ``capacity``, each until its deadline."""

    def __init__(self, *, timeout: float, capacity: int, dispatch, max_host_share: float = 1.0) -> None:
        self.timeout = timeout
        self.capacity = capacity
        self.host_limit = share_limit(max_host_share, capacity)
        """Pending connections one address may hold; its oldest is closed to let its newest in."""
        self._dispatch = dispatch
        self._lock = threading.Lock()
        self._pending: dict[PendingConnection, None] = {}  # oldest first
        self._arrivals: deque[PendingConnection] = deque()
        self._evicted: deque[PendingConnection] = deque()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ConnectionGate", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def admit(self, sock: socket.socket, address: tuple) -> None:
        """Take a new connection; closes the oldest pending one when the budget is full."""
        connection = PendingConnection(sock, address, time.monotonic() + self.timeout)
        with self._lock:
            if self._closed:
                _close(sock)
                return
            host = connection.address[0] if connection.address else None
            own = [c for c in self._pending if c.address and c.address[0] == host]
            if len(own) >= self.host_limit:
                self._evict(next((c for c in own if c.stage is _Stage.WAITING), own[0]), log_it=False)
                peer_log.refused(connection.peer, f"{host} already holds {len(own)} of the {self.capacity} pending "
                                                  "connections; its oldest is closed")
            while len(self._pending) >= self.capacity:
                self._evict_oldest()
            self._pending[connection] = None
            self._arrivals.append(connection)
        self._wake()

    def settle(self, connection: PendingConnection) -> None:
        """``connection`` is associated or gone: it no longer counts as pending."""
        with self._lock:
            connection.stage = _Stage.DONE
            self._pending.pop(connection, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for connection in list(self._pending):
                self._evict(connection, log_it=False)
        self._wake()
        self._thread.join(timeout=5)

    def _evict_oldest(self) -> None:
        waiting = next((c for c in self._pending if c.stage is _Stage.WAITING), None)
        self._evict(waiting or next(iter(self._pending)))

    def _evict(self, connection: PendingConnection, *, log_it: bool = True) -> None:
        """Under the lock: a waiting connection is closed by the gate's thread (it is registered
        there); a negotiating one is shut down, which ends the read its thread is blocked in."""
        self._pending.pop(connection, None)
        if log_it:
            peer_log.refused(connection.peer, f"{self.capacity} connections already waiting to associate, "
                                              "the oldest is closed")
        if connection.stage is _Stage.WAITING:
            self._evicted.append(connection)
        else:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        connection.stage = _Stage.DONE

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the wake-up pipe is full: the gate thread is awake anyway
            pass

    def _run(self) -> None:
        registered: set[PendingConnection] = set()
        while True:
            with self._lock:
                closed = self._closed
                arrivals = list(self._arrivals)
                self._arrivals.clear()
                evicted = list(self._evicted)
                self._evicted.clear()
            for connection in evicted:
                if connection in registered:
                    registered.discard(connection)
                    self._selector.unregister(connection.sock)
                _close(connection.sock)
            if closed:
                for connection in registered:
                    self._selector.unregister(connection.sock)
                    _close(connection.sock)
                for connection in arrivals:
                    _close(connection.sock)
                self._selector.close()
                self._wake_r.close()
                self._wake_w.close()
                return
            for connection in arrivals:
                if connection.stage is _Stage.WAITING:
                    self._selector.register(connection.sock, selectors.EVENT_READ, connection)
                    registered.add(connection)
            now = time.monotonic()
            next_deadline = min((c.deadline for c in registered), default=now + 1.0)
            for key, _ in self._selector.select(timeout=min(max(next_deadline - now, 0.0), 1.0)):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                connection = key.data
                registered.discard(connection)
                self._selector.unregister(connection.sock)
                with self._lock:
                    if connection.stage is not _Stage.WAITING:
                        continue  # evicted meanwhile: closed below with the evicted ones
                    connection.stage = _Stage.NEGOTIATING
                try:
                    self._dispatch(connection)
                except RuntimeError as exc:  # no thread to be had: this connection goes, the gate stays
                    self.settle(connection)
                    _close(connection.sock)
                    peer_log.refused(connection.peer, f"no thread to serve it: {exc}")
            now = time.monotonic()
            for connection in [c for c in registered if c.deadline <= now]:
                with self._lock:
                    if connection.stage is not _Stage.WAITING:
                        continue
                    connection.stage = _Stage.DONE
                    self._pending.pop(connection, None)
                registered.discard(connection)
                self._selector.unregister(connection.sock)
                _close(connection.sock)
                peer_log.refused(connection.peer, f"sent nothing within the {self.timeout:g} s ARTIM timeout")


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _AssociationHandler(BoundedRequestHandler):
    """pynetdicom's request handler, bounded, run to the end of the association in the connection's thread."""

    def __init__(self, connection: PendingConnection, server: "GatedAssociationServer") -> None:
        self.connection = connection
        super().__init__(connection.sock, connection.address, server)

    def handle(self) -> None:
        assoc = self._create_association()
        connection = self.connection
        gate = self.server.gate
        # the PDU reads, pynetdicom's ARTIM timer and its wait for the A-ASSOCIATE-RQ all end at the deadline
        assoc.association_deadline = connection.deadline
        assoc.acse_timeout = max(connection.deadline - time.monotonic(), 0.01)

        def established(event) -> None:
            gate.settle(connection)
            event.assoc.acse_timeout = self.ae.acse_timeout

        assoc.bind(evt.EVT_REQUESTED, _admit_within_share)
        assoc.bind(evt.EVT_REJECTED, _publish_rejection)
        assoc.bind(evt.EVT_ESTABLISHED, established)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        self.ae.release(assoc)
        removed = discard_cut_off(assoc)
        if removed:
            log.info("removed %d data set(s) cut off by %s", removed, connection.peer)


def _peer(assoc) -> events.Peer:
    primitive = assoc.requestor.primitive
    title = str(primitive.calling_ae_title).strip() if primitive is not None else None
    return events.Peer(title or None, assoc.requestor.address or None)


def _admit_within_share(event) -> None:
    """EVT_REQUESTED: an association beyond its host's share is rejected before it negotiates."""
    assoc = event.assoc
    refusal = assoc.ae.admit(assoc)
    if refusal is None:
        return
    peer = _peer(assoc)
    peer_log.refused(f"{peer.address}", f"{refusal}: A-ASSOCIATE-RJ (transient, local limit exceeded)")
    assoc.acse.send_reject(*_REJECT_LOCAL_LIMIT)
    events.publish(events.AssociationRefused(peer, f"share of association slots exceeded: {refusal}"))
    assoc.kill()


def _publish_rejection(event) -> None:
    """EVT_REJECTED: pynetdicom's own rejections (unknown AE titles, all slots taken)."""
    primitive = event.assoc.acceptor.primitive
    code = (primitive.result, primitive.result_source, primitive.diagnostic) if primitive is not None else None
    reason = _REJECT_REASONS.get(code, f"A-ASSOCIATE-RJ {code}")
    events.publish(events.AssociationRefused(_peer(event.assoc), reason))


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the connection gate in front (``ListenerAE`` only)."""

    reuse_port = False
    """Bind with SO_REUSEPORT, so that several listener processes share the port."""

    def __init__(self, ae: ListenerAE, *args, **kwargs) -> None:
        # before the bind: a port that cannot be bound closes the server (and so the gate) at once
        self.gate = ConnectionGate(timeout=ae.artim_timeout, capacity=ae.max_pending_connections,
                                   dispatch=self._start_connection, max_host_share=ae.max_host_share)
        super().__init__(ae, *args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple]:
        client, address = self.socket.accept()
        client.setblocking(True)
        if self.ssl_context:  # the handshake happens in the connection's thread, by its deadline
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request(self, request, client_address) -> None:
        self.gate.admit(request, client_address)

    def _start_connection(self, connection: PendingConnection) -> None:
        threading.Thread(target=self._serve_connection, args=(connection,), daemon=True,
                         name=f"Connection@{connection.peer}").start()

    def _serve_connection(self, connection: PendingConnection) -> None:
        sock = connection.sock
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(max(connection.deadline - time.monotonic(), 0.001))
                try:
                    sock.do_handshake()
                except (OSError, ssl.SSLError) as exc:
                    peer_log.refused(connection.peer, f"TLS handshake failed: {type(exc).__name__}: {exc}")
                    return
                sock.settimeout(None)
            _AssociationHandler(connection, self)
        except Exception:
            log.exception("connection from %s ended with an error", connection.peer)
        finally:
            self.gate.settle(connection)
            self.shutdown_request(sock)

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s ended with an error", client_address)

    def server_close(self) -> None:
        self.gate.close()
        super().server_close()


class SharedPortAssociationServer(GatedAssociationServer):
    """The gated server, bound with SO_REUSEPORT: the kernel spreads associations across processes."""

    reuse_port = True
