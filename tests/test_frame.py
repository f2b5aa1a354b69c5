"""Frame dependence: the within-class Spearman correlation of the logit with width / height, the
figures per band of width / height, and the sample weights that balance the classes per band."""

from __future__ import annotations

import numpy as np
import pytest

from model.frame import (
    band_names,
    bands,
    frame_balance_weights,
    frame_dependence,
    known_aspects,
    summarize,
    to_logit,
)


def _synthetic_fold(n_per_class: int = 300, seed: int = 3):
    """Normals narrower than pneumonias, as in the release (medians about 1.22 and 1.49)."""
    rng = np.random.default_rng(seed)
    aspect = np.concatenate([rng.normal(1.22, 0.12, n_per_class), rng.normal(1.49, 0.12, n_per_class)])
    labels = np.repeat([0, 1], n_per_class)
    return labels, aspect, rng


def test_a_score_that_follows_the_frame_correlates_near_one_within_each_class():
    labels, aspect, rng = _synthetic_fold()
    logits = 4.0 * labels + 3.0 * aspect + rng.normal(0, 0.01, len(labels))  # follows the frame within class
    report = frame_dependence(logits, labels, aspect, threshold=5.0)
    assert report["spearman"]["normal"]["rho"] > 0.99 and report["spearman"]["pneumonia"]["rho"] > 0.99
    assert report["spearman"]["normal"]["n"] == 300 and report["n"] == 600 and report["unknown"] == 0


def test_a_score_independent_of_the_frame_correlates_near_zero():
    labels, aspect, rng = _synthetic_fold()
    logits = 4.0 * labels + rng.normal(0, 1.0, len(labels))
    report = frame_dependence(logits, labels, aspect, threshold=2.0)
    for name in ("normal", "pneumonia"):
        assert abs(report["spearman"][name]["rho"]) < 0.15  # |rho| of independent n=300: sd about 0.058
        assert report["spearman"][name]["p"] > 0.01


def test_specificity_and_sensitivity_per_band_at_the_threshold():
    aspect = np.array([1.0, 1.1, 1.15, 1.19, 1.2, 1.3, 1.39, 1.4, 1.5, 1.6, 1.3, 1.45])
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    logits = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 0.99])
    report = frame_dependence(logits, labels, aspect, threshold=1.0)  # at or above 1.0 is flagged
    assert list(report["bands"]) == ["<1.2", "1.2-1.4", ">=1.4"]
    assert report["bands"]["<1.2"] == {"normal": 4, "pneumonia": 0, "specificity": 0.75, "sensitivity": None}
    assert report["bands"]["1.2-1.4"]["specificity"] == pytest.approx(1 / 3)
    assert report["bands"]["1.2-1.4"]["sensitivity"] == 1.0
    assert report["bands"][">=1.4"]["specificity"] == pytest.approx(1 / 3)
    assert report["bands"][">=1.4"]["sensitivity"] == 0.0


def test_films_of_unknown_proportions_are_left_out():
    labels, aspect, rng = _synthetic_fold(50)
    logits = rng.normal(0, 1, len(labels))
    aspect[:10] = 1.0  # squashed copies
    report = frame_dependence(logits, labels, known_aspects(aspect), threshold=0.0)
    assert report["unknown"] == 10 and report["n"] == 90 and report["spearman"]["normal"]["n"] == 40
    assert sum(b["normal"] + b["pneumonia"] for b in report["bands"].values()) == 90


def test_a_constant_score_has_no_correlation_rather_than_nan():
    labels, aspect, _ = _synthetic_fold(20)
    report = frame_dependence(np.zeros(len(labels)), labels, aspect, threshold=0.5)
    assert report["spearman"]["normal"]["rho"] is None and report["spearman"]["pneumonia"]["p"] is None


def test_mismatched_or_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="one length"):
        frame_dependence(np.zeros(3), np.zeros(2), np.ones(3), 0.0)
    with pytest.raises(ValueError, match="0 \\(NORMAL\\) or 1"):
        frame_dependence(np.zeros(2), np.array([0, 2]), np.ones(2), 0.0)
    with pytest.raises(ValueError, match="increasing"):
        band_names((1.4, 1.2))


def test_bands_put_the_edges_in_the_upper_band_and_nan_nowhere():
    assert bands(np.array([1.19, 1.2, 1.39, 1.4, np.nan])).tolist() == [0, 1, 1, 2, -1]


def test_summary_keeps_the_largest_correlation_and_the_lowest_specificity_over_folds():
    labels, aspect, rng = _synthetic_fold(100)
    follows = frame_dependence(4 * labels + aspect, labels, aspect, threshold=2.0)
    independent = frame_dependence(4 * labels + rng.normal(0, 1, 200), labels, aspect, threshold=2.0)
    summary = summarize([follows, independent])
    assert summary["spearman"]["normal"]["max_abs_rho"] == pytest.approx(1.0)
    assert summary["bands"]["<1.2"]["min_specificity"] == min(
        follows["bands"]["<1.2"]["specificity"], independent["bands"]["<1.2"]["specificity"])


def test_logit_is_the_inverse_of_the_sigmoid_and_clipped():
    p = np.array([0.1, 0.5, 0.9])
    assert np.allclose(1 / (1 + np.exp(-to_logit(p))), p)
    assert np.isfinite(to_logit(np.array([0.0, 1.0]))).all()


def test_balance_weights_give_every_band_the_overall_class_balance():
    labels, aspect, _ = _synthetic_fold(300)
    aspect[::7] = np.nan  # films of unknown proportions are one group more
    weights = frame_balance_weights(labels, aspect)
    overall = np.mean(labels == 1)
    band_of = bands(aspect)
    for b in np.unique(band_of):
        members = band_of == b
        weighted_pneumonia = weights[members & (labels == 1)].sum() / weights[members].sum()
        assert weighted_pneumonia == pytest.approx(overall)
        assert weights[members].sum() == pytest.approx(members.sum())  # each band keeps its size
    unweighted = [np.mean(labels[band_of == b] == 1) for b in (0, 2)]
    assert unweighted[0] < 0.3 and unweighted[1] > 0.7  # the frame did carry the label before


def test_a_band_with_one_class_only_is_left_unweighted():
    labels = np.array([0, 0, 1, 1, 1, 1])
    aspect = np.array([1.1, 1.3, 1.3, 1.3, 1.5, 1.6])
    weights = frame_balance_weights(labels, aspect)
    assert weights[0] == 1.0 and weights[4] == 1.0 and weights[5] == 1.0
    assert weights[1] == pytest.approx((2 / 6) * 3 / 1) and weights[2] == pytest.approx((4 / 6) * 3 / 2)


def _framed_dataset(root):
    """The fold check's tiny films (12 per class, patient-style names, pneumonias with a bright
    patch), reframed: pneumonias mostly wider (as in the release), one square (squashed) copy per class."""
    import cv2

    from tests.test_validation import _tiny_dataset

    widths = {"NORMAL": (88, 88, 104, 120), "PNEUMONIA": (88, 104, 120, 120)}
    _tiny_dataset(root)
    for cls, cycle in widths.items():
        for i, path in enumerate(sorted((root / "train" / cls).iterdir())):
            width = 80 if i == 0 else cycle[i % 4]
            cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (width, 80)))
    return root


def test_the_card_section_measures_every_fold_at_its_threshold_without_the_squashed_copies():
    from model.dataset import LabelledImages
    from model.train import frame_card_section

    labels, aspect, rng = _synthetic_fold(60)
    aspect[:5] = 1.0  # squashed copies
    scores = 1 / (1 + np.exp(-(3 * labels + 2 * aspect)))  # follows the frame within each class
    full = LabelledImages(np.zeros((120, 1, 1), np.uint8), labels, np.arange(120).astype(str),
                          [f"{i}.png" for i in range(120)], aspect.astype(np.float32))
    index = [np.arange(0, 120, 2), np.arange(1, 120, 2)]
    check = {"held_out": [{"index": i, "scores": scores[i]} for i in index],
             "folds": [{"threshold": 0.99}, {"threshold": 0.5}]}
    section = frame_card_section(check, full)
    assert len(section["folds"]) == 2 and section["band_edges"] == [1.2, 1.4]
    assert section["folds"][0]["unknown"] + section["folds"][1]["unknown"] == 5
    assert section["summary"]["spearman"]["normal"]["max_abs_rho"] > 0.99
    # at 0.5 every film is flagged (scores above 0.5), at 0.99 only some: the fold's own threshold is used
    assert all(b["specificity"] in (None, 0.0) for b in section["folds"][1]["bands"].values())
    assert any(b["specificity"] not in (None, 0.0) for b in section["folds"][0]["bands"].values())


def test_balanced_training_batches_carry_the_frame_weights():
    from model.dataset import LabelledImages
    from model.train import _dataset, _frame_weights

    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    aspects = np.array([1.1, 1.1, 1.5, 1.1, 1.5, 1.5, 1.5, 1.0], dtype=np.float32)
    tr = LabelledImages(np.zeros((8, 8, 8), np.uint8), labels, np.arange(8).astype(str),
                        [f"{i}.png" for i in range(8)], aspects)
    class_weight = {0: 8 / 6, 1: 8 / 10}
    weights = _frame_weights(tr, class_weight)
    expected = frame_balance_weights(labels, known_aspects(aspects)) * np.array([class_weight[c] for c in labels])
    assert np.allclose(weights, expected)
    batches = list(_dataset(tr.images, labels, batch_size=8, shuffle=False, seed=0, weights=weights))
    x, y, w = batches[0]
    assert x.shape == (8, 8, 8, 3) and np.allclose(w.numpy(), weights)


@pytest.mark.slow
def test_train_balances_the_frame_and_prints_and_writes_the_frame_dependence(tmp_path):
    import json

    from click.testing import CliRunner

    from worker.cli import cli

    data = _framed_dataset(tmp_path / "data")
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "model"),
                                      "--epochs", "1", "--folds", "2", "--version", "0.0.1",
                                      "--input-size", "64", "--balance-frame", "--preprocessing", "3"])
    assert result.exit_code == 0, result.output
    assert "frame dependence: |Spearman(logit, width/height)| at most" in result.output
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    section = card["validation"]["frame_dependence"]
    assert card["training"]["balance_frame"] is True
    assert card["preprocessing_version"] == "3"  # the version the films were prepared at, for serving
    assert (tmp_path / "model" / "cache" / "train_64_v3.npz").is_file()  # its own cache, beside version 2's
    assert len(section["folds"]) == 2
    assert sum(f["n"] + f["unknown"] for f in section["folds"]) == 24  # every film held out once
    assert sum(f["unknown"] for f in section["folds"]) == 2  # the two square (squashed) films
    assert list(section["folds"][0]["bands"]) == ["<1.2", "1.2-1.4", ">=1.4"]


# sha256 of prepare(version="3")'s bytes for the fixture film: a change here changes what a model
# trained at version "3" sees, and needs another version.
GOLDEN_V3_SHA256 = "7fada10884542e5053a4ca881d28f9becc92fee4b8695bdf7d4a74518827fbc8"


def _padded(film: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    return np.pad(film, ((top, bottom), (left, right)), constant_values=0)


def test_the_frame_crop_gives_the_same_prepared_image_whatever_the_padding():
    from model.preprocessing import prepare, read_image_file
    from tests.helpers.dicom_factory import PNEUMONIA_JPEG

    film = read_image_file(PNEUMONIA_JPEG)  # 419 x 256: width/height 1.64
    others = [_padded(film, 0, 0, 100, 100),    # wider, 2.42
              _padded(film, 80, 80, 0, 0),      # narrower, 1.01
              _padded(film, 300, 10, 0, 0),     # portrait, 0.74, padded on one side
              _padded(film, 5, 40, 200, 3)]     # every side, unevenly
    reference = prepare(film, version="3")
    for other in others:
        assert np.array_equal(prepare(other, version="3"), reference)
        # version "2" squashes the whole frame: the padding and the proportions reach the network
        assert np.abs(prepare(other).astype(int) - prepare(film).astype(int)).mean() > 10


def test_the_frame_crop_is_the_centre_square_of_the_content():
    from model.preprocessing import frame_crop

    film = np.zeros((50, 90), np.uint8)
    film[10:40, 20:80] = np.arange(60, dtype=np.uint8)[None, :] + 1  # content 60 wide, 30 high
    crop = frame_crop(film)
    assert crop.shape == (30, 30) and np.array_equal(crop, film[10:40, 35:65])
    blank = np.zeros((20, 30), np.uint8)
    assert frame_crop(blank) is blank


def test_version_3_keeps_jpeg_and_dicom_byte_identical_and_version_2_unchanged(tmp_path):
    import hashlib

    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_io.pixels import display_image
    from model.preprocessing import PREPROCESSING_VERSION, prepare, prepare_file
    from tests.helpers.dicom_factory import PNEUMONIA_JPEG, write_chest_dicom
    from tests.test_preprocessing import GOLDEN_SHA256

    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        write_chest_dicom(tmp_path / f"{photometric}.dcm", PNEUMONIA_JPEG, transfer_syntax=ExplicitVRLittleEndian,
                          photometric=photometric)
        from_dicom = prepare(display_image(dcmread(tmp_path / f"{photometric}.dcm")), version="3")
        assert np.array_equal(from_dicom, prepare_file(PNEUMONIA_JPEG, version="3"))
    assert hashlib.sha256(prepare_file(PNEUMONIA_JPEG, version="3").tobytes()).hexdigest() == GOLDEN_V3_SHA256
    assert PREPROCESSING_VERSION == "2"  # the installation's version: the shipped card's
    assert hashlib.sha256(prepare_file(PNEUMONIA_JPEG).tobytes()).hexdigest() == GOLDEN_SHA256
    assert hashlib.sha256(prepare_file(PNEUMONIA_JPEG, version="2").tobytes()).hexdigest() == GOLDEN_SHA256


def test_an_unknown_preprocessing_version_is_refused():
    from model.preprocessing import prepare

    with pytest.raises(ValueError, match="unknown preprocessing version '4'"):
        prepare(np.zeros((8, 8), np.uint8), version="4")


def test_a_training_config_names_a_version_the_installation_prepares():
    from model.train import TrainingConfig

    assert TrainingConfig(preprocessing="3").preprocessing == "3"
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        TrainingConfig(preprocessing="4")


def test_the_overlay_lays_the_heat_on_the_region_the_crop_kept_and_none_outside():
    from model.gradcam import overlay
    from model.preprocessing import crop_box

    film = np.zeros((100, 300), np.uint8)
    film[10:90, 40:260] = 120  # content 220 wide, 80 high: the crop is its centre 80 x 80 square
    box = crop_box(film, "3")
    assert box == (10, 110, 80, 80) and crop_box(film, "2") == (0, 0, 100, 300)
    hot = overlay(film, np.ones((16, 16), np.float32), box=box, max_side=300)
    cold = overlay(film, np.zeros((16, 16), np.float32), box=box, max_side=300)
    inside = np.zeros(film.shape, bool)
    inside[10:90, 110:190] = True
    assert hot.shape == (100, 300, 3)
    assert np.array_equal(hot[~inside], cold[~inside])  # no heat where the network saw nothing
    assert (np.abs(hot[inside].astype(int) - cold[inside].astype(int)).sum(axis=1) > 90).all()
    # scaled down for display, the box scales with the film
    small = overlay(film, np.ones((16, 16), np.float32), box=box, max_side=150)
    small_cold = overlay(film, np.zeros((16, 16), np.float32), box=box, max_side=150)
    changed = np.flatnonzero(np.abs(small.astype(int) - small_cold.astype(int)).sum(axis=(0, 2)))
    assert small.shape == (50, 150, 3) and changed.min() == 55 and changed.max() == 94


def _model_at_version(tmp_path, version: str):
    """The shipped model's weights under a card that names preprocessing ``version``."""
    import json
    import shutil

    from model.artifact import CARD_FILE, DEFAULT_MODEL_DIR

    copy = tmp_path / f"model-v{version}"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    card = json.loads((copy / CARD_FILE).read_text())
    card["preprocessing_version"] = version
    (copy / CARD_FILE).write_text(json.dumps(card))
    return copy


def test_a_model_whose_card_says_version_3_gets_its_films_prepared_at_version_3(sessions, sqlite_url, tmp_path):
    # one worker serving both queues (as in `run`): the film is prepared at the card's version,
    # scored by that model, and its heat map drawn through the same crop
    from pydicom import dcmread

    from db.results import list_instances
    from dicom_io.pixels import display_image
    from model.artifact import get_model
    from model.preprocessing import prepare
    from tests.helpers.dicom_factory import PNEUMONIA_JPEG, write_chest_dicom
    from tests.helpers.records import receive_file
    from worker import runtime, tasks
    from worker.celery_app import ALL_QUEUES
    from worker.heatmaps import heatmap_overlay
    from worker.settings import Settings

    model_dir = _model_at_version(tmp_path, "3")
    path = tmp_path / "a.dcm"
    ds = write_chest_dicom(path, PNEUMONIA_JPEG)
    padded = np.pad(display_image(ds), ((0, 0), (150, 150)))  # the same film, wider: the same score at "3"
    with sessions.begin() as s:
        instance_id = receive_file(s, path, ds)
    runtime.configure(Settings(database_url=sqlite_url, data_dir=tmp_path / "data", model_dir=str(model_dir),
                               inference_batch_ms=1))
    runtime.set_worker_queues(ALL_QUEUES)
    try:
        assert runtime.preprocessing_version() == "3" and runtime.infers_here()
        tasks.preprocess([instance_id])
    finally:
        runtime.set_worker_queues(())
        runtime.configure(Settings())
    with sessions() as s:
        [row] = list_instances(s)
    model = get_model(model_dir)
    side = model.card.input_size
    film = display_image(dcmread(path))
    assert row["state"] == "PREDICTED", row["reason"]
    assert row["probability"] == pytest.approx(model.predict(prepare(film, side, "3"))[0], abs=1e-5)
    assert row["probability"] == pytest.approx(model.predict(prepare(padded, side, "3"))[0], abs=1e-5)
    assert abs(row["probability"] - model.predict(prepare(film, side, "2"))[0]) > 1e-4
    heat = heatmap_overlay(path, model)
    assert heat.shape[:2] == film.shape  # drawn on the film as displayed, in its own proportions
