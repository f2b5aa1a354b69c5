"""FHIR R4 resources of a screening result (:mod:`worker.fhir.report`), sent by :mod:`worker.delivery.fhir`."""
