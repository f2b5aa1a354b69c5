"""Results out: every destination (the PACS by C-STORE or STOW-RS, the RIS by HL7 v2, a FHIR server) is
a :class:`~worker.delivery.base.Destination` of one kind, and goes through the one delivery path of
:mod:`worker.delivery.engine` (the row, the claim, retries, FAILED with the reason, the reconciler).
The destinations are built from the settings in :mod:`worker.delivery.config`."""

from worker.delivery.base import Destination, Receipt, SendError
from worker.delivery.config import Resources, configured_destinations, destination_for, resolver
from worker.delivery.engine import (
    deliver,
    deliver_here,
    give_up,
    on_outcome,
    request_deliveries,
    stale_deliveries,
    unrequested_deliveries,
)

__all__ = [
    "Destination", "Receipt", "Resources", "SendError", "configured_destinations", "deliver", "deliver_here",
    "destination_for", "give_up", "on_outcome", "request_deliveries", "resolver", "stale_deliveries",
    "unrequested_deliveries",
]
