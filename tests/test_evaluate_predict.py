"""`pneumoscreen evaluate` and `pneumoscreen predict` on fixture files, as a user runs them."""

from __future__ import annotations

import json
import shutil

import cv2
import pytest
from pydicom.uid import JPEGBaseline8Bit

from model.artifact import read_card
from model.preprocessing import read_image_file
from tests.helpers.dicom_factory import FIXTURES, NORMAL_JPEG, PNEUMONIA_JPEG, write_chest_dicom
from tests.helpers.processes import cli_env, run_cli

pytestmark = pytest.mark.slow  # pneumoscreen processes

EVALUATE_KEYS = {"n", "auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "threshold", "ci95", "calibration",
                 "tn", "fp", "fn", "tp", "model_version"}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Kaggle layout with JPEGs and the same films wrapped in DICOM (JPEG baseline)."""
    root = tmp_path_factory.mktemp("eval")
    for cls in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(FIXTURES / cls, root / cls)
        for jpeg in sorted((FIXTURES / cls).glob("*.jpeg")):
            write_chest_dicom(root / cls / f"{jpeg.stem}.dcm", jpeg, transfer_syntax=JPEGBaseline8Bit)
    return root


def test_evaluate_json_has_the_contract_shape_and_counts(mixed_folder, tmp_path):
    result = run_cli("evaluate", str(mixed_folder), "--json", "--plots", str(tmp_path / "plots"), env=cli_env())
    report = json.loads(result.stdout)
    assert set(report) == EVALUATE_KEYS
    assert report["n"] == 8 and report["tn"] + report["fp"] == 4 and report["fn"] + report["tp"] == 4
    assert report["model_version"] == read_card().version
    assert report["threshold"] == pytest.approx(read_card().threshold)
    assert report["auc"] == pytest.approx(1.0)  # the fixture films are training images
    for name in ("roc.png", "confusion_matrix.png", "score_histogram.png", "reliability.png"):
        image = cv2.imread(str(tmp_path / "plots" / name))
        assert image is not None and image.shape[0] > 200


def test_evaluate_refuses_a_folder_without_the_class_folders(tmp_path):
    result = run_cli("evaluate", str(tmp_path), "--json", env=cli_env(), check=False)
    assert result.returncode == 2 and "NORMAL/ and PNEUMONIA/" in result.stderr


def test_predict_gives_the_same_answer_for_a_jpeg_and_its_dicom_and_writes_heatmaps(tmp_path):
    dicom = tmp_path / "pneumonia.dcm"
    write_chest_dicom(dicom, PNEUMONIA_JPEG)
    result = run_cli("predict", str(PNEUMONIA_JPEG), str(dicom), str(NORMAL_JPEG), "--json",
                     "--heatmap", str(tmp_path / "heat"), env=cli_env())
    rows = json.loads(result.stdout)
    assert [r["error"] for r in rows] == [None, None, None]
    jpeg_row, dicom_row, normal_row = rows
    assert jpeg_row["probability"] == pytest.approx(dicom_row["probability"], abs=1e-6)
    assert jpeg_row["flagged"] is True and normal_row["flagged"] is False
    # the overlay is drawn on the film in its own proportions, not on the square network input
    for row, source in zip(rows, [PNEUMONIA_JPEG, PNEUMONIA_JPEG, NORMAL_JPEG]):
        heat = cv2.imread(row["heatmap"])
        assert heat is not None and heat.shape == (*read_image_file(source).shape, 3)


def test_predict_reports_an_unreadable_file_and_exits_non_zero(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    result = run_cli("predict", str(broken), str(NORMAL_JPEG), "--json", env=cli_env(), check=False)
    assert result.returncode == 1
    rows = json.loads(result.stdout)
    assert rows[0]["error"] and rows[0]["probability"] is None
    assert rows[1]["probability"] is not None
