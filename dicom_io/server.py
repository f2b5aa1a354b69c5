"""The DICOM listener: a pynetdicom SCP. Every entry point is bound here."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.handlers import StoreContext, handle_echo, handle_store
from dicom_io.spool import Spool

log = logging.getLogger(__name__)

# receive each dataset into a temporary file instead of memory
_config.STORE_RECV_CHUNKED_DATASET = True


def _recv_exact(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading straight into one buffer.

    pynetdicom reads a PDU 4 KiB per ``recv()`` call and grows a bytearray:
    some 500 calls for a 2 MB image, the largest CPU cost of a C-STORE on a
    small machine. Same contract: block until ``nr_bytes`` are read, return
    what was read if the peer closes early.
    """
    buffer = bytearray(nr_bytes)
    with memoryview(buffer) as view:
        nr_read = 0
        while nr_read < nr_bytes:
            count = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not count:
                break
            nr_read += count
    del buffer[nr_read:]
    return buffer


AssociationSocket.recv = _recv_exact


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax whose pixel data the installed decoders can read.

    Offering only these makes a PACS send, or transcode to, something we can
    screen; uncompressed syntaxes come first.
    """
    found = []
    for uid in ALL_TRANSFER_SYNTAXES:
        try:
            if get_decoder(UID(uid)).is_available:
                found.append(uid)
        except NotImplementedError:
            continue
    return found


@dataclass(frozen=True)
class ListenerConfig:
    """How the listener talks to the network; values are checked by the settings object."""

    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "PNEUMOSCREEN"
    allowed_aes: frozenset[str] = field(default_factory=frozenset)
    max_associations: int = 16
    max_pdu_size: int = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    reuse_port: bool = False
    """Bind with SO_REUSEPORT, so that several listener processes share the port
    and the kernel spreads associations across them."""

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=self.tls_cert, keyfile=self.tls_key)
        if self.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.tls_client_ca)
        return context


def make_ae(config: ListenerConfig) -> AE:
    """An AE that accepts Verification and every storage SOP class in every decodable transfer syntax."""
    ae = AE(ae_title=config.ae_title)
    ae.add_supported_context(Verification)
    syntaxes = decodable_transfer_syntaxes()
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.require_called_aet = True
    if config.allowed_aes:
        ae.require_calling_aet = sorted(config.allowed_aes)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_size
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    return ae


class SharedPortAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with SO_REUSEPORT."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_listener(config: ListenerConfig, *, spool: Spool, sessions: sessionmaker[Session]):
    """Start the SCP in the background; returns the server (call ``.shutdown()`` to stop)."""
    context = StoreContext.for_database(spool, sessions)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
    ]
    ae = make_ae(config)
    if config.reuse_port:
        # what AE.start_server(block=False) does, with our server class
        server = ae.make_server((config.host, config.port), evt_handlers=handlers, ssl_context=config.ssl_context(),
                                server_class=SharedPortAssociationServer)
        threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{config.port}", daemon=True).start()
        ae._servers.append(server)  # server.shutdown() removes it from there
    else:
        server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers,
                                 ssl_context=config.ssl_context())
    log.info("listening as %s on %s:%d%s%s", config.ae_title, config.host, config.port,
             " (TLS)" if config.tls_cert else "",
             f", calling AEs {', '.join(sorted(config.allowed_aes))}" if config.allowed_aes else ", any calling AE")
    return server
