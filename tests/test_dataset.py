"""The final model's patient split and its operating threshold."""

from __future__ import annotations

import numpy as np
import pytest

from model.dataset import LabelledImages, patient_id, patient_split
from model.metrics import binary_report, threshold_for_sensitivity


@pytest.mark.parametrize("name, patient", [
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("person1689_bacteria_4474.jpeg", "person1689"),
    ("person1689_virus_2920.jpeg", "person1689"),
    ("scan-without-a-patient.png", "scan-without-a-patient"),
])
def test_patient_keys_come_from_the_kermany_file_names(name, patient):
    assert patient_id(name) == patient


def _films(n_patients: int, seed: int = 0) -> LabelledImages:
    """Several films per patient (a patient's films share a class), about a third normal."""
    rng = np.random.default_rng(seed)
    names = []
    for p in range(n_patients):
        for j in range(int(rng.integers(1, 5))):
            names.append(f"IM-{p:04d}-{j + 1:04d}.jpeg" if p % 3 == 0 else f"person{p}_bacteria_{j}.jpeg")
    labels = np.array([int(n.startswith("person")) for n in names])
    return LabelledImages(np.zeros((len(names), 4, 4), np.uint8), labels,
                          np.array([patient_id(n) for n in names]), names, np.ones(len(names), np.float32))


@pytest.mark.parametrize("seed", [1234, 7])
def test_the_validation_split_keeps_every_patient_on_one_side_and_stratifies(seed):
    data = _films(600)
    train_idx, val_idx = patient_split(data, val_fraction=0.2, seed=seed)
    assert not set(data.patients[train_idx]) & set(data.patients[val_idx])
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(len(data)))
    assert abs(len(val_idx) / len(data) - 0.2) < 0.03
    assert abs(data.labels[val_idx].mean() - data.labels.mean()) < 0.04
    again = patient_split(data, val_fraction=0.2, seed=seed)
    assert np.array_equal(again[1], val_idx)  # the same seed, the same split


def test_the_threshold_is_the_highest_that_keeps_the_sensitivity():
    labels = np.array([1] * 100 + [0] * 50)
    scores = np.concatenate([np.linspace(0.01, 0.99, 100), np.linspace(0.0, 0.5, 50)])
    t = threshold_for_sensitivity(labels, scores, 0.97)
    assert t == pytest.approx(np.sort(scores[:100])[3])  # 3 of 100 pneumonias may be missed
    report = binary_report(labels, scores, t)
    assert report["sensitivity"] == pytest.approx(0.97)
    # any higher threshold loses a pneumonia more
    assert binary_report(labels, scores, t + 1e-6)["sensitivity"] < 0.97
    assert report["fp"] == int(np.sum(scores[100:] >= t))


def test_a_threshold_needs_pneumonias_to_be_set_on():
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity(np.zeros(5), np.linspace(0, 1, 5), 0.97)


def test_several_folders_train_together_a_film_in_two_counts_once_and_no_patient_is_on_both_sides(tmp_path):
    """Two copies of one release (the second squashed and re-encoded, with films the first lacks):
    each film once, from the first folder that has it; a patient whose films are spread over both
    folders stays on one side of the split."""
    import cv2

    from model.train import load_training_folders

    rng = np.random.default_rng(3)
    first, second = tmp_path / "chest_xray", tmp_path / "chest_xray_224"

    def film(folder, cls: str, name: str, shape: tuple[int, int]) -> None:
        (folder / "train" / cls).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "train" / cls / name), rng.integers(0, 255, shape, dtype=np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 75])

    expected = set()
    for p in range(40):
        cls, stem = ("NORMAL", f"IM-{p:04d}") if p % 3 == 0 else ("PNEUMONIA", f"person{p}")
        name = (lambda j: f"{stem}-{j:04d}.jpeg") if cls == "NORMAL" else (lambda j: f"{stem}_bacteria_{j}.jpeg")
        film(first, cls, name(1), (48, 60))  # original proportions
        film(second, cls, name(1), (32, 32))  # the same film, squashed: kept from the first folder only
        film(second, cls, name(2), (32, 32))  # the same patient's next film, only in the second
        expected |= {(cls, name(1)), (cls, name(2))}

    data = load_training_folders([first, second], size=32, cache_dir=tmp_path / "cache")
    names = [(("NORMAL", "PNEUMONIA")[label], path.name) for path, label in zip(data.paths, data.labels)]
    assert len(names) == len(set(names)) == len(expected) and set(names) == expected
    from_first = {path.name for path in data.paths if first in path.parents}
    assert from_first == {name for _, name in expected if name.endswith(("-0001.jpeg", "_bacteria_1.jpeg"))}
    assert (data.aspects[[first in p.parents for p in data.paths]] == 60 / 48).all()
    train_idx, val_idx = patient_split(data, val_fraction=0.25, seed=5)
    assert not set(data.patients[train_idx]) & set(data.patients[val_idx])
    assert len(set(data.patients)) == 40
