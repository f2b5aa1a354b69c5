"""HL7 v2.5.1 with the RIS: the ORU^R01 we send per screened study (:mod:`worker.hl7.oru`), the
acknowledgements both ways (:mod:`worker.hl7.ack`), the RIS's final reports read as verdicts
(:mod:`worker.hl7.report`) and the MLLP listener that receives them (:mod:`worker.hl7.listener`).

Messages are built and checked against the 2.5.1 structure with hl7apy; MLLP framing, escaping and
lenient parsing of what peers send come from python-hl7 (``hl7``)."""
