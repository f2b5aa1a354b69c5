"""The DICOM listener: a pynetdicom SCP. Every entry point is bound here."""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.admission import GatedAssociationServer, ListenerAE, SharedPortAssociationServer
from dicom_io.handlers import StoreContext, handle_echo, handle_store
from dicom_io.spool import Spool
from dicom_io.wire import PeerBounds

log = logging.getLogger(__name__)

# receive each dataset into a temporary file instead of memory
_config.STORE_RECV_CHUNKED_DATASET = True


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


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    """How the listener talks to the network. Built from the settings (``worker.runtime.listener_config``),
    which hold every default and check every value."""

    host: str
    port: int
    ae_title: str
    allowed_aes: frozenset[str]
    """Calling AE titles accepted; empty: any."""
    max_associations: int
    max_pdu_size: int
    artim_timeout: float
    """A connection must complete its association this long after it was accepted (ARTIM)."""
    max_pending_connections: int
    """Connections not yet associated; when full, the oldest is closed."""
    max_host_share: float = 0.5
    """Share of the association slots (and of the pending connections) one calling address or
    calling AE title may hold."""
    max_dataset_bytes: int
    """Largest data set a C-STORE may bring."""
    network_timeout: float
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    dimse_timeout: float = 60.0
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


def make_ae(config: ListenerConfig, *, min_free_bytes: int = 0) -> ListenerAE:
    """An AE that accepts Verification and every storage SOP class in every decodable transfer syntax,
    with the bounds of ``dicom_io.wire`` and ``dicom_io.admission``."""
    bounds = PeerBounds(stored_dataset_bytes=config.max_dataset_bytes, min_free_bytes=min_free_bytes)
    ae = ListenerAE(config.ae_title, peer_bounds=bounds, artim_timeout=config.artim_timeout,
                    max_pending_connections=config.max_pending_connections,
                    max_host_share=config.max_host_share)
    ae.add_supported_context(Verification)
    syntaxes = decodable_transfer_syntaxes()
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.require_called_aet = True
    if config.allowed_aes:
        ae.require_calling_aet = sorted(config.allowed_aes)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu_size
    ae.acse_timeout = config.artim_timeout  # pynetdicom's ARTIM timer and its wait for the A-ASSOCIATE-RQ
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    return ae


def start_listener(config: ListenerConfig, *, spool: Spool, sessions: sessionmaker[Session]):
    """Start the SCP in the background; returns the server (call ``.shutdown()`` to stop)."""
    context = StoreContext.for_database(spool, sessions)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
    ]
    ae = make_ae(config, min_free_bytes=spool.min_free_bytes)
    server_class = SharedPortAssociationServer if config.reuse_port else GatedAssociationServer
    # what AE.start_server(block=False) does, with our server class
    server = ae.make_server((config.host, config.port), evt_handlers=handlers, ssl_context=config.ssl_context(),
                            server_class=server_class)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{config.port}", daemon=True).start()
    ae._servers.append(server)  # server.shutdown() removes it from there
    log.info("listening as %s on %s:%d%s%s", config.ae_title, config.host, config.port,
             " (TLS)" if config.tls_cert else "",
             f", calling AEs {', '.join(sorted(config.allowed_aes))}" if config.allowed_aes else ", any calling AE")
    return server
