"""The DICOM listener: a pynetdicom SCP. Every entry point is bound here."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.handlers import StoreContext, handle_echo, handle_store
from dicom_io.spool import Spool

log = logging.getLogger(__name__)


def make_ae(ae_title: str, *, allowed_aes: Iterable[str] = (), maximum_associations: int = 16,
            timeout: float = 60.0) -> AE:
    """An AE that accepts Verification and every storage SOP class in any transfer syntax."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.require_called_aet = True
    allowed = sorted(allowed_aes)
    if allowed:
        ae.require_calling_aet = allowed
    ae.maximum_associations = maximum_associations
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def start_listener(*, host: str, port: int, ae_title: str, spool: Spool, sessions: sessionmaker[Session],
                   allowed_aes: Iterable[str] = ()):
    """Start the SCP in the background; returns the server (call ``.shutdown()`` to stop)."""
    context = StoreContext(spool=spool, sessions=sessions)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
    ]
    ae = make_ae(ae_title, allowed_aes=allowed_aes)
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    log.info("listening as %s on %s:%d", ae_title, host, port)
    return server
