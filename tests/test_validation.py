"""The k-fold check: deterministic perturbations, patient folds, the figures
and their spread, and the card written by training with folds."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from model.operating_point import HELD_OUT_FILE, load_held_out, transferable_threshold
from model.preprocessing import INPUT_SIZE, prepare, read_image_file
from model.validation import PERTURBATIONS, aggregate, fold_report, patient_folds, perturb, shifted_images
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_each_perturbation_is_deterministic_and_changes_the_film(name):
    image = read_image_file(PNEUMONIA_JPEG)
    first, second = perturb(image, name), perturb(image.copy(), name)
    assert first.dtype == np.uint8 and first.ndim == 2
    assert np.array_equal(first, second)
    assert first.shape != image.shape or np.abs(first.astype(int) - image.astype(int)).mean() > 1.0
    clean, shifted = prepare(image), prepare(first)
    if name.startswith("gamma"):
        # a pure tone curve: the contrast normalization of prepare() undoes it
        assert np.abs(clean.astype(int) - shifted.astype(int)).mean() < 2.0
    else:
        assert np.abs(clean.astype(int) - shifted.astype(int)).mean() > 1.0


def test_unknown_perturbation_is_refused():
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(np.zeros((32, 32), dtype=np.uint8), "solarize")


def test_shifted_images_are_prepared_per_perturbation_in_path_order():
    shifted = shifted_images([NORMAL_JPEG, PNEUMONIA_JPEG])
    assert set(shifted) == set(PERTURBATIONS)
    for name, batch in shifted.items():
        assert batch.shape == (2, INPUT_SIZE, INPUT_SIZE) and batch.dtype == np.uint8
        assert np.array_equal(batch[1], prepare(perturb(read_image_file(PNEUMONIA_JPEG), name)))


def test_patient_folds_keep_each_patient_on_one_side_and_stratify():
    rng = np.random.default_rng(0)
    patients = np.array([f"p{i}" for i in range(300) for _ in range(rng.integers(1, 4))])
    label_of = {f"p{i}": int(i % 3 != 0) for i in range(300)}  # about 2/3 positive patients
    labels = np.array([label_of[p] for p in patients])
    folds = patient_folds(labels, patients, k=3, seed=7)
    assert len(folds) == 3
    held_out = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(held_out), np.arange(len(labels)))  # each image held out once
    for train_idx, test_idx in folds:
        assert not set(patients[train_idx]) & set(patients[test_idx])
        assert len(np.intersect1d(train_idx, test_idx)) == 0
        assert abs(labels[test_idx].mean() - labels.mean()) < 0.05
    assert [te.tolist() for _, te in folds] == [te.tolist() for _, te in patient_folds(labels, patients, k=3, seed=7)]


def test_patient_folds_refuse_fewer_patients_than_folds():
    with pytest.raises(ValueError, match="fewer than the 3 folds"):
        patient_folds(np.array([0, 0, 1, 1, 1]), np.array(["a", "a", "b", "c", "d"]), k=3)


def _known_fold():
    """100 positives scored 0.01..1.00 and 100 negatives scored 0.0..0.495 step 0.005."""
    labels = np.array([1] * 100 + [0] * 100)
    scores = np.concatenate([np.arange(1, 101) / 100, np.arange(100) * 0.005])
    return labels, scores


def test_fold_report_sets_the_threshold_on_the_clean_fold_and_keeps_it_for_the_shifts():
    labels, scores = _known_fold()
    # the threshold keeps 97 of 100 positives: the 4th lowest positive score, 0.04
    shifted = {"same": scores.copy(), "negatives_up": np.where(labels == 0, scores + 0.5, scores)}
    report = fold_report(labels, scores, shifted, target_sensitivity=0.97)
    assert report["threshold"] == pytest.approx(0.04)
    assert report["clean"]["sensitivity"] == pytest.approx(0.97)
    assert report["clean"]["specificity"] == pytest.approx(0.08)  # negatives 0.0 .. 0.035 stay below 0.04
    assert report["shifted"]["same"] == report["clean"]
    assert report["shifted"]["negatives_up"]["specificity"] == 0.0
    assert report["shifted_mean"]["specificity"] == pytest.approx(0.04)
    assert report["shifted_worst"]["specificity"] == 0.0
    assert report["shifted_worst"]["perturbation"] == "negatives_up"


def test_aggregate_reports_mean_and_sample_sd_over_folds():
    def report(auc: float, spec: float) -> dict:
        figures = {"auc": auc, "sensitivity": 0.97, "specificity": spec}
        return {"threshold": 0.5, "clean": figures, "shifted": {"a": figures},
                "shifted_mean": figures, "shifted_worst": {**figures, "perturbation": "a"}}

    summary = aggregate([report(0.90, 0.6), report(0.94, 0.8), report(0.98, 1.0)])
    assert summary["clean"]["auc"]["mean"] == pytest.approx(0.94)
    assert summary["clean"]["auc"]["sd"] == pytest.approx(0.04)
    assert summary["clean"]["specificity"]["sd"] == pytest.approx(0.2)
    assert summary["shifted_mean"]["specificity"]["min"] == pytest.approx(0.6)
    assert summary["shifted"]["a"]["specificity"]["values"] == pytest.approx([0.6, 0.8, 1.0])
    assert aggregate([report(0.9, 0.5)])["clean"]["auc"]["sd"] == 0.0


def _tiny_dataset(root, patients_per_class: int = 6):
    """Films with patient-style names: PNEUMONIA ones carry a bright patch."""
    rng = np.random.default_rng(3)
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).mkdir(parents=True)
        for p in range(patients_per_class):
            for j in range(2):
                image = cv2.GaussianBlur(rng.integers(0, 255, (80, 96), dtype=np.uint8), (0, 0), 3)
                if cls == "PNEUMONIA":
                    image[20:60, 30:70] = np.clip(image[20:60, 30:70].astype(int) + 90, 0, 255)
                    name = f"person{100 + p}_bacteria_{p * 10 + j}.jpeg"
                else:
                    name = f"IM-{100 + p:04d}-{j + 1:04d}.jpeg"
                cv2.imwrite(str(root / "train" / cls / name), image)
    return root


@pytest.mark.slow
def test_training_with_folds_writes_the_spread_into_the_card(tmp_path):
    from model.train import TrainingConfig, train

    data = _tiny_dataset(tmp_path / "data")
    config = TrainingConfig(epochs=1, batch_size=8, input_size=64, folds=2, version="0.0.1")
    card = train(data, tmp_path / "model", config)
    written = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert written["validation"] == json.loads(json.dumps(card.validation))
    cv, shifted = written["validation"]["cross_validation"], written["validation"]["shifted"]
    assert cv["folds"] == 2
    for metric in ("auc", "sensitivity", "specificity"):
        assert len(cv[metric]["values"]) == 2 and cv[metric]["sd"] >= 0.0
        assert len(shifted["mean"][metric]["values"]) == 2
    assert set(shifted["perturbations"]) == set(PERTURBATIONS)
    assert all(s >= 0.97 for s in cv["sensitivity"]["values"])
    assert "patient_split" in written["validation"]
    assert written["training"]["augmentation"] == "standard"
    calibration = written["validation"]["calibration"]
    assert calibration["slope"] > 0 or "not_calibrated" in calibration
    if "not_calibrated" not in calibration:
        op = written["validation"]["operating_point"]
        assert written["threshold"] == op["threshold"]
        assert [s["name"] for s in op["sets"]] == ["fold 1", "fold 2", "patient split"]
        assert op["ci95"][0] <= op["threshold"] <= op["ci95"][1]
        assert 0.97 <= op["design_sensitivity"] <= 0.995 and written["training"]["operating_point"] == "margin"
        assert op["pooled"]["sensitivity"] >= op["design_sensitivity"]
        # the sets are kept beside the weights: the same threshold comes back from them, and another rule can be tried
        sets = load_held_out(tmp_path / "model" / HELD_OUT_FILE)
        assert [name for name, _, _ in sets] == ["fold 1", "fold 2", "patient split"]
        assert sum(len(labels) for _, labels, _ in sets) == op["pooled"]["n"]
        again = transferable_threshold(sets, target_sensitivity=0.97, seed=config.seed)
        assert again["threshold"] == pytest.approx(op["threshold"], abs=1e-6)


def _zoomed_box_sides(stretch: float) -> np.ndarray:
    """(height, width) of a centred square after the training zoom, for 64 draws."""
    import keras

    from model.network import build_network

    keras.utils.set_random_seed(0)
    x = np.zeros((64, 64, 64, 3), np.float32)
    x[:, 16:48, 16:48] = 1.0
    zoomed = build_network(64, stretch=stretch).get_layer("aug_zoom")(x, training=True).numpy()[..., 0] > 0.5
    return np.array([(z.any(axis=1).sum(), z.any(axis=0).sum()) for z in zoomed], dtype=float)


def test_the_training_zoom_stretches_each_axis_on_its_own():
    sides = _zoomed_box_sides(0.25)
    ratio = sides[:, 0] / sides[:, 1]
    assert ratio.min() < 0.85 and ratio.max() > 1.15  # a square comes out of other proportions
    assert sides.max() >= 32 * 1.25 - 1  # zoomed in by up to 25 % on an axis
    same = _zoomed_box_sides(0.0)
    assert np.all(np.abs(same[:, 0] - same[:, 1]) <= 1)  # stretch 0: one factor for both axes


def test_acquisition_augmentation_keeps_shape_and_range():
    import tensorflow as tf

    from model.augment import acquisition_augment

    tf.random.set_seed(0)
    x = tf.random.uniform((4, 64, 64, 1))
    y = acquisition_augment(x).numpy()
    assert y.shape == (4, 64, 64, 1) and 0.0 <= y.min() and y.max() <= 1.0
    assert np.abs(y - x.numpy()).mean() > 0.01


@pytest.mark.slow
def test_train_command_runs_the_fold_check_and_prints_its_spread(tmp_path):
    from click.testing import CliRunner

    from worker.cli import cli

    data = _tiny_dataset(tmp_path / "data", patients_per_class=5)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "model"),
                                      "--epochs", "1", "--folds", "2", "--version", "0.0.1", "--stretch", "0.3",
                                      "--augmentation", "framing", "--sensitivity", "0.95",
                                      "--operating-point", "pooled"])
    assert result.exit_code == 0, result.output
    assert "2-fold check: AUC" in result.output and "shifted" in result.output
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert len(card["validation"]["cross_validation"]["specificity"]["values"]) == 2
    assert card["validation"]["shifted"]["worst"]["specificity"]["sd"] >= 0.0
    assert card["training"]["stretch"] == 0.3 and card["training"]["augmentation"] == "framing"
    assert card["training"]["target_sensitivity"] == 0.95 and card["training"]["operating_point"] == "pooled"
    if "operating_point" in card["validation"]:
        assert card["validation"]["operating_point"]["design_sensitivity"] == 0.95
        assert "operating point: design sensitivity 0.95 for 0.95" in result.output


def test_train_command_refuses_a_single_fold(tmp_path):
    from click.testing import CliRunner

    from worker.cli import cli

    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--folds", "1"])
    assert result.exit_code != 0 and "--folds" in result.output


def test_the_one_axis_crops_change_the_films_proportions_only_along_their_axis():
    image = read_image_file(PNEUMONIA_JPEG)
    rows, cols = image.shape
    assert perturb(image, "crop_rows_0.8").shape == (round(rows * 0.8), cols)
    assert perturb(image, "crop_columns_0.8").shape == (rows, round(cols * 0.8))
    both = perturb(image, "crop_zoom_0.85")
    assert both.shape == (round(rows * 0.85), round(cols * 0.85))
    top = (rows - round(rows * 0.8)) // 2
    assert np.array_equal(perturb(image, "crop_rows_0.8"), image[top:top + round(rows * 0.8)])


def test_the_framing_crop_cuts_one_axis_towards_the_drawn_proportions():
    from model.augment import FRAMING_MIN_FRACTION, framing_fractions

    aspects = np.array([[1.2], [1.5], [1.3], [1.0], [2.0]], np.float32)
    targets = np.array([[1.5], [1.2], [1.3], [2.5], [1.0]], np.float32)
    rows, columns = (t.numpy().ravel() for t in framing_fractions(aspects, targets))
    assert rows == pytest.approx([0.8, 1.0, 1.0, FRAMING_MIN_FRACTION, 1.0])
    assert columns == pytest.approx([1.0, 0.8, 1.0, 1.0, FRAMING_MIN_FRACTION])
    # where no clip applies, the kept box has the drawn proportions
    kept = aspects.ravel() * columns / rows
    assert kept[:3] == pytest.approx(targets.ravel()[:3])


def test_the_framing_recipe_reframes_each_film_to_proportions_drawn_from_the_pool():
    """Films of proportions 1 (a square of 64 x 64 prepared pixels) reframed to
    proportions 1 / 0.6: the crop keeps at most 60 % of the rows, so a band
    across 40 % of the rows fills more of the frame than it did."""
    import tensorflow as tf

    from model.augment import acquisition_augment

    tf.random.set_seed(0)
    x = np.zeros((32, 64, 64, 1), np.float32)
    x[:, 19:45] = 1.0  # 26 of 64 rows
    framed = acquisition_augment(tf.constant(x), np.ones(32, np.float32), np.array([1 / 0.6], np.float32))
    plain = acquisition_augment(tf.constant(x))
    band = lambda y: (y.numpy()[..., 0].mean(axis=2) > 0.5).mean(axis=1)  # noqa: E731
    assert band(framed).mean() > 0.58 and band(plain).mean() < 0.5


def test_training_data_carry_each_films_proportions_through_the_cache(tmp_path):
    from model.dataset import load_folder

    data = _tiny_dataset(tmp_path / "data", patients_per_class=2)
    cache = tmp_path / "cache.npz"
    first = load_folder(data / "train", size=64, cache=cache, progress=False)
    assert first.aspects == pytest.approx(np.full(len(first), 96 / 80))
    with np.load(cache) as z:
        older = {k: z[k] for k in z.files if k != "aspects"}
    np.savez(cache, **older)  # a cache written before the proportions were kept: rebuilt
    again = load_folder(data / "train", size=64, cache=cache, progress=False)
    assert again.aspects == pytest.approx(first.aspects)
    assert again.subset(np.array([1, 0])).aspects == pytest.approx(first.aspects[[1, 0]])


def test_the_framing_recipe_needs_the_films_proportions():
    from model.train import _dataset

    with pytest.raises(ValueError, match="aspects"):
        _dataset(np.zeros((2, 64, 64), np.uint8), np.array([0, 1]), batch_size=2, shuffle=False, seed=0,
                 augmentation="framing")


@pytest.mark.slow
@pytest.mark.parametrize("average", ["swa", "ema"])
def test_averaged_weights_come_back_with_batch_norm_statistics_of_their_own(tmp_path, average):
    """The network of an averaged run holds the average, not the last (or best) epoch's weights,
    and its batch-norm statistics are those of the averaged weights on training batches."""
    import keras

    from model.dataset import load_folder, patient_split
    from model.network import build_network
    from model.train import TrainingConfig, fit_network, predict_prepared

    full = load_folder(_tiny_dataset(tmp_path / "data") / "train", size=64)
    train_idx, val_idx = patient_split(full, val_fraction=0.3, seed=1)
    tr, va = full.subset(train_idx), full.subset(val_idx)
    base = TrainingConfig(epochs=3, batch_size=4, input_size=64, average="swa", average_epochs=1)
    keras.utils.set_random_seed(base.seed)
    initial = [w.numpy() for w in build_network(64).trainable_weights]

    def run(config: TrainingConfig):
        model, facts = fit_network(tr, va, config)
        assert facts["epochs_run"] == 3
        moved = float(sum(np.abs(w.numpy() - w0).sum() for w, w0 in zip(model.trainable_weights, initial)))
        return model, facts, moved

    last_model, _, last = run(base)  # the "mean" of the last epoch alone: the raw weights at the end
    if average == "swa":
        model, facts, averaged = run(TrainingConfig(**{**base.__dict__, "average_epochs": 3}))
        assert facts["weights"] == "mean of epochs 1-3"
        assert 0.0 < averaged < 0.97 * last  # the first epochs pull the mean back towards the start
        assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(model.get_weights(), last_model.get_weights()))
    else:
        model, facts, averaged = run(TrainingConfig(**{**base.__dict__, "average": "ema", "ema": 0.99}))
        assert "momentum 0.99" in facts["weights"]
        assert averaged < 0.5 * last  # a dozen steps at momentum 0.99 barely leave the start
    assert facts["batch_norm_batches"] == -(-len(tr) // 4)  # every training batch, fewer than BN_BATCHES
    assert np.isfinite(predict_prepared(model, va.images)).all()
    with pytest.raises(ValueError, match="average"):
        TrainingConfig(average="mean")
    with pytest.raises(ValueError, match="average_epochs"):
        TrainingConfig(epochs=3, average="swa", average_epochs=4)


def test_batch_norm_statistics_are_re_estimated_as_the_plain_mean_over_batches():
    import keras
    import tensorflow as tf

    from model.train import recalibrate_batch_norm

    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(momentum=0.9)])
    x = np.random.default_rng(0).normal([1.0, -2.0, 5.0], [1.0, 3.0, 0.5], size=(12, 3)).astype(np.float32)
    batches = tf.data.Dataset.from_tensor_slices((x, np.zeros(12, np.float32))).batch(4)
    assert recalibrate_batch_norm(model, batches, batches=10) == 3
    layer = model.layers[0]
    chunks = x.reshape(3, 4, 3)
    assert np.allclose(layer.moving_mean.numpy(), chunks.mean(axis=1).mean(axis=0), atol=1e-5)
    assert np.allclose(layer.moving_variance.numpy(), chunks.var(axis=1).mean(axis=0), atol=1e-4)
    assert layer.momentum == 0.9  # given back
