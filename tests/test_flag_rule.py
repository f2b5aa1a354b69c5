"""The flag rule in its three forms agrees: one image (``ModelCard.flags``, ``flagged_at``), a
study in Python (``study_flagged``, used by the SR) and a study in SQL (``any_image_flagged``,
used by the worklist and the rescreen summary); threshold choice and measurement use the same
comparison, a score exactly at the threshold flagged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from db.results import rescreen_changes, worklist
from model.artifact import flagged_at, study_flagged
from model.metrics import binary_report, threshold_for_sensitivity
from model.operating_point import design_sensitivity
from tests.helpers.records import answer, model_card, receive

THRESHOLD = 0.5
PATTERNS = [flags for n in (1, 2, 3) for flags in itertools.product([False, True], repeat=n)]


@pytest.fixture
def database_url(any_database_url):
    return any_database_url


def test_a_score_at_the_threshold_is_flagged_by_the_card_and_by_the_metrics():
    card = model_card(threshold=THRESHOLD)
    assert card.flags(THRESHOLD) and not card.flags(np.nextafter(THRESHOLD, 0))
    assert list(flagged_at(np.array([0.49, 0.5, 0.51]), THRESHOLD)) == [False, True, True]
    report = binary_report(np.array([1, 0]), np.array([THRESHOLD, THRESHOLD]), THRESHOLD)
    assert (report["tp"], report["fp"]) == (1, 1)
    labels, scores = np.array([1, 1, 1, 1, 0]), np.array([0.2, 0.4, 0.6, 0.8, 0.1])
    threshold = threshold_for_sensitivity(labels, scores, 0.75)
    assert threshold == 0.4 and binary_report(labels, scores, threshold)["sensitivity"] == 0.75
    assert design_sensitivity([(labels, scores)], 0.75) == 0.75


def test_the_study_flag_in_sql_is_the_study_flag_in_python(sessions):
    old, new = model_card("1.0", threshold=THRESHOLD), model_card("2.0", threshold=THRESHOLD)
    expected, ids = {}, []
    with sessions.begin() as s:
        for number, flags in enumerate(PATTERNS):
            study = f"1.2.{number}"
            for image, flagged in enumerate(flags):
                instance_id, _ = receive(s, study, f"{study}.{image}", accession=f"A{number}")
                answer(s, [(instance_id, 0.1)], old)
                answer(s, [(instance_id, 0.9 if flagged else 0.2)], new)
                ids.append(instance_id)
            expected[study] = study_flagged(flags)
    with sessions() as s:
        rows = {row["study_instance_uid"]: row["flagged"] for row in worklist(s)}
        changes = rescreen_changes(s, instance_ids=ids, model_version="2.0")
    assert rows == expected
    assert {c["study_instance_uid"]: c["flagged_after"] for c in changes["changed_studies"]} == \
        {study: True for study, flagged in expected.items() if flagged}
    assert sum(expected.values()) == len(PATTERNS) - 3  # one all-normal pattern per study size
