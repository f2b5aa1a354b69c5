"""`pneumoscreen calibrate --from-verdicts`, end to end: films sent to the listener by C-STORE
(dcmtk's storescu), prepared and screened by the pipeline, radiologists' verdicts recorded through
the API; too small a sample refused, then a site artifact whose card records the sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.accounts import add_account
from db.models import Instance
from model.artifact import read_card, sha256_file
from model.site import sample_hash
from tests.helpers.dicom_factory import write_chest_dicom
from tests.helpers.listener import Listener
from tests.helpers.processes import storescu
from tests.test_calibrate import _variants
from worker.settings import Settings

TOKEN = "9c1e3a5b7d2f4068a1b3c5d7e9f20416"
NORMALS, PNEUMONIAS = 20, 12


def _send_and_screen(tmp_path, database_url, sessions) -> dict[str, int]:
    """One study per film, sent by C-STORE and screened: StudyInstanceUID -> label."""
    from model.artifact import get_model
    from worker.pipeline import predict_and_record, preprocess_instances
    from worker.runtime import eligibility_policy

    rng = np.random.default_rng(31)
    truth, files = {}, []
    for label, cls, count in ((0, "NORMAL", NORMALS), (1, "PNEUMONIA", PNEUMONIAS)):
        for i, film in enumerate(_variants(cls, count, tmp_path / "films" / cls, rng)):
            ds = write_chest_dicom(tmp_path / "dicom" / f"{cls}_{i}.dcm", film, accession=f"{cls[:1]}{i}")
            truth[ds.StudyInstanceUID] = label
            files.append(tmp_path / "dicom" / f"{cls}_{i}.dcm")
    listener = Listener(tmp_path, database_url)
    try:
        storescu(listener.port, *files)
    finally:
        listener.close()
    model = get_model()
    with sessions() as s:
        ids = list(s.scalars(select(Instance.id).order_by(Instance.id)))
    assert len(ids) == NORMALS + PNEUMONIAS
    prepared = preprocess_instances(sessions, ids, policy=eligibility_policy(Settings(_env_file=None)),
                                    size=model.card.input_size)
    predict_and_record(sessions, model, prepared)
    return truth


def _calibrate(*args: str):
    from worker.cli import cli

    return CliRunner().invoke(cli, ["calibrate", "--from-verdicts", *args], catch_exceptions=False)


@pytest.mark.slow
def test_calibrate_from_verdicts_refuses_a_small_sample_then_writes_the_site_model(monkeypatch, tmp_path,
                                                                                    database_url, sessions):
    from worker.api.app import create_app

    for name, value in (("DATA_DIR", tmp_path), ("DATABASE_URL", database_url), ("API_TOKEN", TOKEN)):
        monkeypatch.setenv(f"PNEUMOSCREEN_{name}", str(value))
    truth = _send_and_screen(tmp_path, database_url, sessions)
    assert "no study with a verdict" in _calibrate("--sensitivity", "0.75", "--out", str(tmp_path / "none")).output
    with sessions.begin() as s:
        _, reader = add_account(s, name="dr.site", role="radiologist")
    with TestClient(create_app(Settings())) as api:
        for uid, label in truth.items():
            answer = api.post(f"/studies/{uid}/verdict", json={"finding": ("normal", "pneumonia")[label]},
                              headers={"Authorization": f"Bearer {reader}"})
            assert answer.status_code == 200, answer.text

    refused = _calibrate("--sensitivity", "0.9", "--out", str(tmp_path / "refused"))
    assert refused.exit_code == 1 and "12 pneumonia films; a threshold for sensitivity 0.9 needs at least 30" in refused.output
    assert not (tmp_path / "refused" / "model_card.json").exists()

    made = _calibrate("--sensitivity", "0.75", "--out", str(tmp_path / "site"), "--site", "St Verdict", "--json")
    assert made.exit_code == 0, made.output
    report = json.loads(made.stdout)
    card, base = read_card(tmp_path / "site"), read_card()
    assert card.version == f"{base.version}+site.st.verdict" == report["version"]
    assert sha256_file(tmp_path / "site" / "model.keras") == base.sha256
    calibration = card.site_calibration
    assert (calibration["source"], calibration["unit"], calibration["studies"]) == ("verdicts", "study", 32)
    assert (calibration["pneumonia"], calibration["normal"], calibration["films"]) == (PNEUMONIAS, NORMALS, 32)
    assert calibration["sample_sha256"] == sample_hash(
        [(p, truth[ds_uid]) for ds_uid, p in _spool_paths(sessions).items()])
    for key in ("at_card_threshold", "at_site_threshold"):
        assert set(calibration[key]["ci95"]) >= {"sensitivity", "specificity"}
    assert calibration["at_site_threshold"]["sensitivity"] >= 0.75
    assert (tmp_path / "site" / "held_out_scores.npz").is_file() and (tmp_path / "site" / "reference_inputs.json").is_file()


def _spool_paths(sessions) -> dict[str, str]:
    from db.models import Series, Study

    with sessions() as s:
        return dict(s.execute(select(Study.StudyInstanceUID, Instance.path).join(Series, Series.study_id == Study.id)
                              .join(Instance, Instance.series_id == Series.id)).all())
