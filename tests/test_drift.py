"""Drift without labels: the statistics on synthetic windows, and `pneumoscreen drift` on two sets
of films sent through the pipeline and screened by the shipped model: films like its training films
(drawn from the training folder, at their original size) do not drift; the same kind of films from
another acquisition (collimated to other proportions, exposed brighter, another detector) do."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.uid import JPEGBaseline8Bit

from db.drift import recent_screened
from model.drift import MIN_WINDOW, FilmInput, Reference, compare, input_statistics
from tests.helpers.dicom_factory import chest_dataset
from tests.helpers.records import receive_file

DATA = Path(os.environ.get("PNEUMOSCREEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TRAINING = DATA / "chest_xray"
WINDOW = 100


def _films(rng, n, *, aspect=1.4, brightness=120.0, megapixels=1.2, modality=None):
    out = []
    for _ in range(n):
        mp = megapixels * rng.lognormal(0, 0.3)
        a = aspect * rng.lognormal(0, 0.1)
        rows = int(np.sqrt(mp * 1e6 / a))
        out.append(FilmInput(rows=rows, columns=int(rows * a), brightness=float(np.clip(rng.normal(brightness, 15), 0, 255)),
                             modality=modality))
    return out


def _reference(rng) -> Reference:
    scores = np.concatenate([rng.beta(0.5, 8, 700), rng.beta(8, 0.5, 1300)])
    return Reference(scores=scores, threshold=0.5, inputs=input_statistics(_films(rng, 2000), source="synthetic"))


def test_a_window_like_the_reference_does_not_drift_and_each_kind_of_shift_does():
    rng = np.random.default_rng(31)
    ref = _reference(rng)
    like = np.concatenate([rng.beta(0.5, 8, 70), rng.beta(8, 0.5, 130)])
    same = compare(ref, probabilities=like, flagged=like >= 0.5, inputs=_films(rng, 200))
    assert not same["drifted"] and same["reasons"] == [] and same["window"] == 200
    assert same["inputs"]["modality"]["note"].startswith("not judged")
    portrait = compare(ref, probabilities=like, flagged=like >= 0.5, inputs=_films(rng, 200, aspect=0.8))
    assert portrait["drifted"] and [r.split(":")[0] for r in portrait["reasons"]] == ["aspect"]
    dark = compare(ref, probabilities=like, flagged=like >= 0.5, inputs=_films(rng, 200, brightness=70))
    assert [r.split(":")[0] for r in dark["reasons"]] == ["brightness"]
    normals = rng.beta(0.5, 8, 200)  # a site where few films show pneumonia: flag rate and scores move
    few = compare(ref, probabilities=normals, flagged=normals >= 0.5, inputs=_films(rng, 200))
    assert few["drifted"] and few["flag_rate"]["drifted"] and few["scores"]["drifted"]
    assert not few["inputs"]["aspect"]["drifted"]


def test_a_small_window_is_not_judged_and_the_mix_is_judged_against_a_reference_that_has_one():
    rng = np.random.default_rng(7)
    ref = _reference(rng)
    small = compare(ref, probabilities=[0.9] * (MIN_WINDOW - 1), flagged=[True] * (MIN_WINDOW - 1), inputs=[])
    assert not small["drifted"] and "judged on at least" in small["note"]
    with_header = Reference(ref.scores, 0.5, input_statistics(_films(rng, 500, modality="CR"), source="CR site"))
    p = np.concatenate([rng.beta(0.5, 8, 35), rng.beta(8, 0.5, 65)])
    moved = compare(with_header, probabilities=p, flagged=p >= 0.5, inputs=_films(rng, 100, modality="DX"))
    assert moved["inputs"]["modality"]["drifted"] and moved["reasons"] == ["modality mix: a share moved by 1.00"]
    with pytest.raises(ValueError):
        FilmInput(rows=0, columns=10, brightness=10)


def _original_sizes() -> dict[str, tuple[int, int]]:
    with open(TRAINING / "MANIFEST.tsv", newline="") as f:
        return {r["filename"]: (int(r["orig_width"]), int(r["orig_height"]))
                for r in csv.DictReader(f, delimiter="\t") if r["split"] == "train"}


def _acquire(source: Path, size: tuple[int, int], out: Path, *, shifted: bool) -> Path:
    """The film at its original size as a JPEG; shifted: the middle 55% of its columns (portrait
    collimation) and a brighter exposure (display gamma 0.55)."""
    grey = cv2.resize(cv2.imread(str(source), cv2.IMREAD_GRAYSCALE), size, interpolation=cv2.INTER_LINEAR)
    if shifted:
        w = grey.shape[1]
        grey = grey[:, int(w * 0.225):int(w * 0.775)]
        grey = np.clip(255.0 * (grey / 255.0) ** 0.55, 0, 255).astype(np.uint8)
    cv2.imwrite(str(out), grey, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return out


def _screen(sessions, model, films: list[Path], folder: Path, *, shifted: bool) -> None:
    """Each film as a DX DICOM in the spool, received, prepared by the pipeline and screened by ``model``."""
    from worker.pipeline import predict_and_record, preprocess_instances
    from worker.runtime import eligibility_policy
    from worker.settings import Settings

    sizes = _original_sizes()
    folder.mkdir(parents=True)
    ids = []
    for i, source in enumerate(films):
        jpeg = _acquire(source, sizes[source.name], folder / f"{i}.jpeg", shifted=shifted)
        ds = chest_dataset(jpeg, transfer_syntax=JPEGBaseline8Bit, sop_class="DX", modality="DX")
        ds.Manufacturer = "OTHER VENDOR" if shifted else "KERMANY-LIKE"
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with sessions.begin() as s:
            ids.append(receive_file(s, path, ds))
    prepared = preprocess_instances(sessions, ids, policy=eligibility_policy(Settings(_env_file=None)),
                                    size=model.card.input_size)
    assert len(prepared) == len(films)
    predict_and_record(sessions, model, prepared)


def _drift_json(monkeypatch, tmp_path, database_url) -> dict:
    from worker.cli import cli

    monkeypatch.setenv("PNEUMOSCREEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PNEUMOSCREEN_DATABASE_URL", database_url)
    monkeypatch.setenv("PNEUMOSCREEN_DRIFT_WINDOW", str(WINDOW))
    result = CliRunner().invoke(cli, ["drift", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not (TRAINING / "MANIFEST.tsv").is_file(), reason=f"the training films are not at {TRAINING}")
def test_drift_says_no_for_training_like_films_and_yes_for_another_acquisition(monkeypatch, tmp_path, sessions,
                                                                              database_url):
    from model.artifact import get_model

    model = get_model()
    films = sorted((TRAINING / "train").glob("*/*.jpeg"))
    random.Random(31).shuffle(films)
    _screen(sessions, model, films[:WINDOW], tmp_path / "like", shifted=False)
    like = _drift_json(monkeypatch, tmp_path, database_url)
    assert like["window"] == like["inputs_window"] == WINDOW and like["model_version"] == model.card.version
    assert not like["drifted"], like["reasons"]
    assert like["inputs"]["manufacturer"]["window"] == {"KERMANY-LIKE": 1.0}

    _screen(sessions, model, films[WINDOW:2 * WINDOW], tmp_path / "shifted", shifted=True)
    shifted = _drift_json(monkeypatch, tmp_path, database_url)  # the window is now the shifted films alone
    with sessions() as s:
        assert len(recent_screened(s, model_version=model.card.version, limit=1000)) == 2 * WINDOW
    assert shifted["drifted"]
    moved = {reason.split(":")[0] for reason in shifted["reasons"]}
    assert {"aspect", "brightness"} <= moved, shifted["reasons"]
    assert shifted["inputs"]["aspect"]["window_median"] < 1.0 < like["inputs"]["aspect"]["window_median"]
    from worker.api.drift_metrics import DriftCollector

    metrics = {m.name: m for m in DriftCollector(lambda: sessions, None, WINDOW).collect()}
    assert metrics["pneumoscreen_drift_drifted"].samples[0].value == 1
    by_statistic = {s.labels["statistic"]: s.value for s in metrics["pneumoscreen_drift_statistic"].samples}
    assert by_statistic["aspect"] == shifted["inputs"]["aspect"]["statistic"]
    assert {"scores", "aspect", "brightness", "megapixels", "flag_rate"} <= set(by_statistic)
