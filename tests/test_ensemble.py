"""An ensemble recipe: several networks served as one model, the mean of their logits
through one calibrated output, with Grad-CAM over every member."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.artifact import LoadedModel, save_artifact
from model.dataset import load_folder, patient_split
from model.gradcam import gradcam
from model.operating_point import HELD_OUT_FILE, Platt, fold_into_dense, load_held_out
from model.preprocessing import prepare, read_image_file
from model.train import TrainingConfig, predict_prepared
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG
from tests.test_validation import _tiny_dataset

SIZE = 64


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


def _members(count: int = 2, size: int = SIZE):
    """Networks with different random weights and output layers that spread their scores."""
    import keras

    from model.network import build_network

    members = []
    for seed in range(count):
        keras.utils.set_random_seed(seed + 10)
        member = build_network(size)
        kernel, bias = member.get_layer("pneumonia").get_weights()
        member.get_layer("pneumonia").set_weights([kernel * 20, bias + seed - 0.5])
        members.append(member)
    return members


def _films(size: int = SIZE) -> np.ndarray:
    return np.stack([prepare(read_image_file(p), size) for p in (PNEUMONIA_JPEG, NORMAL_JPEG)]
                    + [np.random.default_rng(i).integers(0, 256, (size, size), dtype=np.uint8) for i in range(3)])


def test_the_ensemble_serves_the_mean_of_its_members_logits_and_is_calibrated_like_one_network(tmp_path):
    from model.network import build_ensemble

    members, films = _members(3), _films()
    ensemble = build_ensemble(members)
    member_logits = np.stack([_logit(predict_prepared(m, films)) for m in members])
    assert np.ptp(member_logits, axis=0).max() > 0.5  # members that disagree, or the mean proves nothing
    assert _logit(predict_prepared(ensemble, films)) == pytest.approx(member_logits.mean(axis=0), abs=1e-4)
    assert not [layer.name for layer in ensemble.layers if layer.name.startswith("aug_")]

    fold_into_dense(ensemble, Platt(slope=1.7, intercept=-0.4))
    calibrated = predict_prepared(ensemble, films)
    assert _logit(calibrated) == pytest.approx(1.7 * member_logits.mean(axis=0) - 0.4, abs=1e-3)
    # one file, loaded as any model is, gives the same probabilities
    save_artifact(ensemble, tmp_path / "ensemble", name="ensemble", version="0.0.1", threshold=0.5, input_size=SIZE)
    assert LoadedModel(tmp_path / "ensemble").predict(films) == pytest.approx(calibrated.tolist(), abs=1e-5)


def test_an_ensemble_needs_two_members_of_one_input_size():
    from model.network import build_ensemble

    with pytest.raises(ValueError, match="at least two"):
        build_ensemble(_members(1))
    with pytest.raises(ValueError, match="takes 96 pixels"):
        build_ensemble([*_members(1), *_members(1, size=96)])
    with pytest.raises(ValueError, match="at least two"):
        TrainingConfig(members=("acquisition",))
    with pytest.raises(ValueError, match="augmentation must be one of"):
        TrainingConfig(members=("acquisition", "mixup"))


def test_the_ensembles_heat_map_follows_the_members_that_carry_its_score():
    """A member whose logit weighs nothing adds nothing to the ensemble's map: the map is then
    its other member's own; with both weighing, it is neither member's alone."""
    from model.network import build_ensemble

    first, second = _members(2)
    film = _films()[0]
    alone = [gradcam(member, film) for member in (first, second)]
    assert np.abs(alone[0] - alone[1]).mean() > 0.02

    ensemble = build_ensemble([first, second])
    both = gradcam(ensemble, film)
    assert both.shape == (SIZE, SIZE) and both.min() >= 0 and both.max() == pytest.approx(1.0, abs=0.05)
    assert min(np.abs(both - alone[0]).mean(), np.abs(both - alone[1]).mean()) > 0.005

    kernel, bias = ensemble.get_layer("pneumonia").get_weights()
    ensemble.get_layer("pneumonia").set_weights([np.array([[1.0], [0.0]], kernel.dtype), np.zeros_like(bias)])
    assert gradcam(ensemble, film) == pytest.approx(alone[0], abs=1e-4)
    with pytest.raises(ValueError, match="no layer"):
        gradcam(ensemble, film, layer="nowhere")


@pytest.mark.slow
def test_the_train_command_builds_an_ensemble_checked_and_served_as_one_model(tmp_path):
    from click.testing import CliRunner

    from worker.cli import cli

    data = _tiny_dataset(tmp_path / "data", patients_per_class=5)
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(out), "--epochs", "1",
                                      "--folds", "2", "--version", "0.0.2", "--input-size", str(SIZE),
                                      "--augmentation", "acquisition", "--augmentation", "framing"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model_card.json").read_text())
    training = card["training"]
    assert training["augmentation"] == "acquisition+framing"
    assert [m["augmentation"] for m in training["members"]] == ["acquisition", "framing"]
    assert all(m["epochs_run"] == 1 for m in training["members"])
    assert training["seconds"] == pytest.approx(sum(m["seconds"] for m in training["members"]), abs=0.2)
    model = LoadedModel(out)
    names = {layer.name for layer in model.keras_model.layers}
    assert {"m1_head_relu", "m2_head_relu", "m1_logit", "m2_logit", "pneumonia"} <= names
    sets = load_held_out(out / HELD_OUT_FILE)
    assert [name for name, _, _ in sets] == ["fold 1", "fold 2", "patient split"]
    # the patient split's kept scores are the ensemble's before calibration: calibrated, they are what it serves
    full = load_folder(data / "train", size=SIZE)
    _, val_idx = patient_split(full, val_fraction=0.2, seed=1234)
    served = np.array(model.predict(full.images[val_idx]))
    calibration = card["validation"]["calibration"]
    raw = sets[-1][2]
    assert _logit(served) == pytest.approx(calibration["slope"] * _logit(raw) + calibration["intercept"], abs=1e-3)
    assert gradcam(model.keras_model, full.images[val_idx][0]).shape == (SIZE, SIZE)
