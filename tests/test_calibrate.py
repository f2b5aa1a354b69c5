"""`pneumoscreen calibrate`: a site's labelled sample in, a site artifact out, as a user runs it."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from model.artifact import read_card, sha256_file
from model.site import SampleTooSmall, check_sample, minimum_positives, sample_hash, site_name
from tests.helpers.dicom_factory import FIXTURES, write_chest_dicom
from tests.helpers.processes import cli_env, run_cli

NORMALS, PNEUMONIAS = 20, 12


def _variants(cls: str, count: int, folder, rng) -> list:
    """``count`` films made from the fixture films of ``cls``: other crops, exposure and noise."""
    sources = sorted((FIXTURES / cls).glob("*.jpeg"))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        grey = cv2.imread(str(sources[i % len(sources)]), cv2.IMREAD_GRAYSCALE)
        h, w = grey.shape
        top, left = rng.integers(0, h // 12), rng.integers(0, w // 12)
        film = grey[top:h - rng.integers(0, h // 12), left:w - rng.integers(0, w // 12)].astype(float)
        film = 255.0 * (film / 255.0) ** rng.uniform(0.8, 1.25) + rng.normal(0, 3, film.shape)
        path = folder / f"{cls.lower()}_{i:02d}.png"
        cv2.imwrite(str(path), np.clip(film, 0, 255).astype(np.uint8))
        written.append(path)
    return written


@pytest.fixture(scope="module")
def site_sample(tmp_path_factory):
    rng = np.random.default_rng(16)
    root = tmp_path_factory.mktemp("site")
    for cls, count in (("NORMAL", NORMALS), ("PNEUMONIA", PNEUMONIAS)):
        _variants(cls, count, root / cls, rng)
    return root


def test_the_sample_must_show_about_three_misses_at_the_requested_sensitivity():
    assert minimum_positives(0.97) == 100 and minimum_positives(0.9) == 30 and minimum_positives(0.75) == 12
    check_sample(np.array([0] * 20 + [1] * 100), 0.97)
    with pytest.raises(SampleTooSmall, match="99 pneumonia films; .* needs at least 100"):
        check_sample(np.array([0] * 20 + [1] * 99), 0.97)
    with pytest.raises(SampleTooSmall, match="19 normal films"):
        check_sample(np.array([0] * 19 + [1] * 100), 0.97)


def test_site_names_fit_a_version():
    assert site_name("St Elsewhere (Rad)") == "st.elsewhere.rad"
    with pytest.raises(ValueError):
        site_name("---")
    with pytest.raises(ValueError, match="longer than"):
        site_name("a" * 21)


@pytest.mark.slow
def test_calibrate_writes_a_site_artifact_that_evaluate_and_the_workers_can_use(site_sample, tmp_path):
    out = tmp_path / "site-model"
    result = run_cli("calibrate", str(site_sample), "--sensitivity", "0.75", "--out", str(out),
                     "--site", "St Elsewhere", "--json", env=cli_env())
    report = json.loads(result.stdout)
    base = read_card()
    card = read_card(out)  # verifies the weights against the card
    assert card.version == f"{base.version.split('+')[0]}+site.st.elsewhere" == report["version"]
    assert sha256_file(out / "model.keras") == card.sha256 == base.sha256  # the same weights
    assert card.threshold == report["threshold"]
    calibration = card.site_calibration
    assert calibration["images"] == NORMALS + PNEUMONIAS
    assert (calibration["pneumonia"], calibration["normal"]) == (PNEUMONIAS, NORMALS)
    files = [(p, label) for label, cls in enumerate(("NORMAL", "PNEUMONIA")) for p in (site_sample / cls).iterdir()]
    assert calibration["sample_sha256"] == sample_hash(files)
    assert calibration["base_version"] == base.version and calibration["base_threshold"] == base.threshold
    site = calibration["at_site_threshold"]
    assert site["sensitivity"] >= 0.75 and site["threshold"] == card.threshold
    low, high = site["ci95"]["sensitivity"]
    assert 0.0 <= low <= site["sensitivity"] <= high <= 1.0
    assert set(calibration["at_card_threshold"]["calibration"]) == {"brier", "ece"}
    assert card.intended_population == base.intended_population

    evaluated = json.loads(run_cli("evaluate", str(site_sample), "--model", str(out), "--json", env=cli_env()).stdout)
    assert evaluated["threshold"] == pytest.approx(card.threshold)
    assert evaluated["model_version"] == card.version
    assert evaluated["sensitivity"] == pytest.approx(site["sensitivity"])

    again = run_cli("calibrate", str(site_sample), "--sensitivity", "0.75", "--out", str(out), env=cli_env(),
                    check=False)
    assert again.returncode == 2 and "already holds a model" in again.stderr


@pytest.mark.slow
def test_calibrate_reads_dicom_files_with_a_labels_csv(site_sample, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    rows = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for png in sorted((site_sample / cls).iterdir()):
            name = f"{png.stem}.dcm"
            write_chest_dicom(folder / name, png, transfer_syntax=ExplicitVRLittleEndian)
            rows.append({"file": name, "label": cls if label else "0"})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label"])
        writer.writeheader()
        writer.writerows(rows)
    report = json.loads(run_cli("calibrate", str(folder), "--labels", str(tmp_path / "labels.csv"),
                                "--sensitivity", "0.75", "--out", str(tmp_path / "m"), "--json", env=cli_env()).stdout)
    assert (report["images"], report["pneumonia"]) == (NORMALS + PNEUMONIAS, PNEUMONIAS)
    assert report["version"].endswith("+site.dicom")


@pytest.mark.slow
def test_calibrate_refuses_a_sample_too_small_for_the_sensitivity(site_sample, tmp_path):
    result = run_cli("calibrate", str(site_sample), "--sensitivity", "0.97", "--out", str(tmp_path / "m"),
                     env=cli_env(), check=False)
    assert result.returncode == 1
    assert f"{PNEUMONIAS} pneumonia films; a threshold for sensitivity 0.97 needs at least 100" in result.stderr
    assert not (tmp_path / "m").exists()
