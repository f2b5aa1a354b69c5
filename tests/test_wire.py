"""The listener's refusal log, without a network: one line per refused peer, at most a burst
per window, then the count of those not logged."""

from __future__ import annotations

import logging
import time

from dicom_io.wire import PeerLog


def test_refused_peers_are_logged_at_most_a_burst_per_window(caplog):
    logger = logging.getLogger("test.peerlog")
    peer_log = PeerLog(logger, burst=5, window=0.5)
    with caplog.at_level(logging.WARNING, logger="test.peerlog"):
        for n in range(50):
            peer_log.refused(f"10.0.0.{n}:104", "unknown PDU type 0x47")
        assert len(caplog.records) == 5
        time.sleep(0.6)
        peer_log.refused("10.0.0.99:104", "unknown PDU type 0x47")
    assert len(caplog.records) == 6
    assert "45 more refused peers not logged" in caplog.records[-1].getMessage()
