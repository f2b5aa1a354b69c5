"""The shipped model artifact: complete, matching its card, a real trained model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from model.artifact import (
    CARD_FILE,
    DEFAULT_MODEL_DIR,
    WEIGHTS_FILE,
    ModelArtifactError,
    get_model,
    read_card,
    sha256_file,
)
from model.preprocessing import PREPROCESSING_VERSION, prepare_file
from tests.helpers.dicom_factory import FIXTURES


def test_shipped_card_names_the_weights_and_the_validation():
    card = read_card()
    assert card.sha256 == sha256_file(DEFAULT_MODEL_DIR / WEIGHTS_FILE)
    assert card.preprocessing_version == PREPROCESSING_VERSION
    assert 0 < card.threshold < 1 and card.input_size >= 96
    val = card.validation["patient_split"]
    assert val["n"] == val["tn"] + val["fp"] + val["fn"] + val["tp"] and val["threshold"] == card.threshold
    # the threshold is the one chosen on every held-out set pooled, and carried to each set from the others
    point = card.validation["operating_point"]
    assert point["threshold"] == card.threshold and point["ci95"][0] <= card.threshold <= point["ci95"][1]
    assert point["pooled"]["sensitivity"] >= card.training["target_sensitivity"]
    assert len(point["transfer"]["sets"]) >= 2 and point["transfer"]["sensitivity"]["min"] >= 0.95
    assert card.intended_population["age_years"] == {"min": 1, "max": 5}
    assert "CC BY 4.0" in card.training_data["source"]
    assert (DEFAULT_MODEL_DIR / WEIGHTS_FILE).stat().st_size < 20 * 1024 * 1024


def test_shipped_model_separates_the_fixture_films():
    model = get_model()
    normal = sorted((FIXTURES / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((FIXTURES / "PNEUMONIA").glob("*.jpeg"))
    scores = model.predict(np.stack([prepare_file(p, model.card.input_size) for p in normal + pneumonia]))
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert max(scores[: len(normal)]) < model.card.threshold <= min(scores[len(normal):])


def test_altered_weights_are_refused(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    with open(copy / WEIGHTS_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelArtifactError, match="sha256"):
        read_card(copy)


def test_card_for_another_preprocessing_is_refused(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    card = json.loads((copy / CARD_FILE).read_text())
    card["preprocessing_version"] = "0"
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelArtifactError, match="preprocessing version"):
        read_card(copy)


def test_cached_arrays_of_another_preprocessing_are_rebuilt(tmp_path):
    from model.dataset import load_folder

    cache = tmp_path / "train_224.npz"
    first = load_folder(FIXTURES, cache=cache, progress=False)
    with np.load(cache) as z:
        assert str(z["preprocessing"]) == PREPROCESSING_VERSION
        stale = {k: z[k] for k in z.files}
    # the same files cached by an older preprocessing: not to be trained on
    np.savez(cache, **{**stale, "images": np.zeros_like(stale["images"]), "preprocessing": np.array("1")})
    again = load_folder(FIXTURES, cache=cache, progress=False)
    assert np.array_equal(again.images, first.images)
    assert np.array_equal(first.images[0], prepare_file(first.paths[0]))
    with np.load(cache) as z:
        assert str(z["preprocessing"]) == PREPROCESSING_VERSION


def test_curves_give_the_roc_ends_the_reliability_bins_and_the_brier_score():
    from model.metrics import curves

    rng = np.random.default_rng(3)
    labels = np.array([0] * 300 + [1] * 200)
    scores = np.clip(np.where(labels == 1, rng.normal(0.7, 0.15, 500), rng.normal(0.3, 0.15, 500)), 0, 1)
    found = curves(labels, scores, points=40, bins=10)
    roc = found["roc"]
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    assert len(roc["fpr"]) <= 40 and roc["fpr"] == sorted(roc["fpr"])
    assert sum(b["count"] for b in found["reliability"]) == 500
    assert all(b["low"] <= b["mean_predicted"] <= b["high"] for b in found["reliability"])
    assert found["brier"] == pytest.approx(float(np.mean((scores - labels) ** 2)))
    with pytest.raises(ValueError, match="both classes"):
        curves(np.zeros(5), np.linspace(0, 1, 5))


def test_the_shipped_card_carries_curves_that_agree_with_its_figures():
    split = read_card().validation["patient_split"]
    roc = split["curves"]["roc"]
    assert abs(float(np.trapezoid(roc["tpr"], roc["fpr"])) - split["auc"]) < 0.01
    assert sum(b["count"] for b in split["curves"]["reliability"]) == split["n"]
