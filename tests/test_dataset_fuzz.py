"""The dataset mutation fuzzer's short run (the long one is `bench/fuzz.py datasets`): every
mutant of every seed file is refused at store with a status, or ends PREDICTED, SKIPPED or
FAILED with a reason; nothing raises, nothing stays in flight, no decoding takes long."""

from __future__ import annotations

import pytest

from tests.helpers.dataset_fuzz import MUTATIONS, run_dataset_fuzz

pytestmark = pytest.mark.slow  # the shipped model scores what decodes


def test_hundreds_of_mutated_files_each_end_refused_or_terminal_with_a_reason(tmp_path, sessions,
                                                                             invalid_dicom_allowed):
    # the mutants carry invalid values on purpose, and the product meets them as it runs: with pydicom warning
    report = run_dataset_fuzz(tmp_path, sessions, count=448, seed=7)
    assert set(report.tried) == set(MUTATIONS) and sum(report.tried.values()) == 448
    assert report.crashes == [], report.crashes[:5]
    assert report.not_terminal == [] and report.without_reason == []
    refused = sum(n for outcome, n in report.outcomes.items() if outcome.startswith("store 0x"))
    ended = sum(report.outcomes[s] for s in ("PREDICTED", "SKIPPED", "FAILED"))
    assert refused + ended >= 448 - report.outcomes.get("store 0x0000", 0)
    assert report.outcomes["PREDICTED"] > 0 and report.outcomes["FAILED"] > 0
    assert report.slowest_decode_s < 10
