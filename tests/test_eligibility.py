"""The intended-population gate: the patient's age from the header, and the verdict on a film
outside, inside or not known to be within the ages the model card states."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from dicom_io.eligibility import IntendedPopulation, describe_age, patient_age_years
from model.artifact import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE, read_card
from tests.helpers.dicom_factory import PNEUMONIA_JPEG, chest_dataset
from worker.runtime import eligibility_policy
from worker.settings import Settings

CARD = eligibility_policy(Settings(_env_file=None))
"""The defaults: the shipped card's ages 1-5, films of other ages refused."""
ANY_AGE = eligibility_policy(Settings(_env_file=None, intended_population="any"))


def MALFORMED(test):  # noqa: N802  (a decorator named like the marks it stands for)
    """The test sets the malformed values a sender may send: pydicom warns instead of raising (its
    strict validation for the session, tests/conftest.py), and that warning is expected."""
    return pytest.mark.usefixtures("invalid_dicom_allowed")(
        pytest.mark.filterwarnings("ignore:Invalid value for VR")(test))


def _header(**attributes: str) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@MALFORMED
@pytest.mark.parametrize("age, years", [("045Y", 45.0), ("004Y", 4.0), ("018M", 1.5), ("006M", 0.5),
                                        ("010W", 70 / 365.25), ("005D", 5 / 365.25), ("45Y", 45.0), ("045y ", 45.0),
                                        ("58", 58.0), ("4", 4.0)])
def test_patient_age_reads_every_unit_of_an_age_string(age, years):
    assert patient_age_years(_header(PatientAge=age)) == pytest.approx(years)


@MALFORMED
@pytest.mark.parametrize("attributes, years", [
    ({"PatientBirthDate": "20230315", "StudyDate": "20261126"}, 3 + 8 / 12),
    ({"PatientBirthDate": "20200101", "StudyDate": "20251231"}, 5 + 11 / 12),  # 5 years 11 months: still 5
    ({"PatientBirthDate": "20250101", "StudyDate": "20251231"}, 11 / 12),  # 11 months: age 0
    ({"PatientBirthDate": "19800601", "SeriesDate": "20261126"}, 46 + 5 / 12),
    ({"PatientBirthDate": "19800601", "StudyDate": "2026", "AcquisitionDate": "20261126"}, 46 + 5 / 12),
    ({"PatientBirthDate": "19800601", "ContentDate": "20260601"}, 46.0),
    ({"PatientBirthDate": "1980.06.01", "StudyDate": "2026.05.31"}, 45 + 11 / 12),  # ACR-NEMA dates
    ({"PatientAge": "", "PatientBirthDate": "20230101", "StudyDate": "20261126"}, 3 + 10 / 12),
    ({"PatientAge": "45", "PatientBirthDate": "20230101", "StudyDate": "20261126"}, 3 + 10 / 12),
    ({"PatientAge": "004Y", "PatientBirthDate": "19800101", "StudyDate": "20261126"}, 4.0),  # the age string wins
])
def test_patient_age_from_the_birth_date_and_the_study_date_in_completed_months(attributes, years):
    assert patient_age_years(_header(**attributes)) == pytest.approx(years)


@MALFORMED
@pytest.mark.parametrize("attributes", [
    {},
    {"PatientAge": ""},
    {"PatientAge": "  "},
    {"PatientAge": "XYZ"},
    {"PatientAge": "-05Y"},
    {"PatientAge": "0045Y"},
    {"PatientAge": "000Y"},
    {"PatientAge": "0"},
    {"PatientAge": "045Y\\046Y"},
    {"PatientBirthDate": "20230101"},
    {"StudyDate": "20261126"},
    {"PatientBirthDate": "", "StudyDate": "20261126"},
    {"PatientBirthDate": "2023", "StudyDate": "20261126"},
    {"PatientBirthDate": "20231301", "StudyDate": "20261126"},
    {"PatientBirthDate": "20230230", "StudyDate": "20261126"},
    {"PatientBirthDate": "20230101", "StudyDate": "not-a-date"},
    {"PatientBirthDate": "20270101", "StudyDate": "20261126"},  # born after the study
])
def test_patient_age_is_unknown_when_the_header_does_not_tell(attributes):
    assert patient_age_years(_header(**attributes)) is None


@pytest.mark.parametrize("years, text", [(45.0, "45 years"), (2.0, "2 years"), (1.99, "23 months"),
                                         (8 / 12, "8 months"), (1 / 12, "1 month"), (0.01, "under 1 month"),
                                         (89.9, "89 years"), (90.0, "over 89 years"), (104.0, "over 89 years")])
def test_ages_are_told_in_years_from_two_in_months_below_and_over_89_as_one_group(years, text):
    assert describe_age(years) == text


def test_the_population_comes_from_the_card_and_a_card_without_ages_sets_no_gate():
    shipped = read_card(verify=False).intended_population
    population = IntendedPopulation.from_card(shipped)
    assert (population.min_age_years, population.max_age_years) == (1, 5)
    assert population.description == shipped["description"] and population.ages == "ages 1-5"
    assert CARD.population == population and not CARD.screen_any_age and ANY_AGE.screen_any_age
    assert IntendedPopulation.from_card({}) is None and IntendedPopulation.from_card(None) is None
    assert IntendedPopulation.from_card({"description": "adults", "age_years": {"min": 18}}).ages == "ages 18 and over"
    for bad in ({"min": 5, "max": 1}, {"min": "one"}, [1, 5], {"min": -1, "max": 5}):
        with pytest.raises(ValueError, match="intended_population.age_years"):
            IntendedPopulation.from_card({"age_years": bad})


@pytest.mark.parametrize("attributes", [{"patient_age": "001Y"}, {"patient_age": "005Y"}, {"patient_age": "012M"},
                                        {"birth_date": "20201201", "patient_age": None}])  # 5 years 11 months
def test_a_film_within_the_intended_population_is_screened_without_a_note(attributes):
    for policy in (CARD, ANY_AGE):
        verdict = policy.judge(chest_dataset(PNEUMONIA_JPEG, **attributes))
        assert verdict.eligible and verdict.note is None and verdict.reason is None


@pytest.mark.parametrize("attributes, aged", [
    ({"patient_age": "045Y"}, "45 years"),
    ({"patient_age": "011M"}, "11 months"),
    ({"patient_age": "006Y"}, "6 years"),
    ({"patient_age": "093Y"}, "over 89 years"),
    ({"birth_date": "19800101"}, "46 years"),
    ({"birth_date": "20251201"}, "11 months"),
])
def test_a_film_outside_the_intended_population_is_refused_unless_every_age_is_screened(attributes, aged):
    ds = chest_dataset(PNEUMONIA_JPEG, **attributes)
    verdict = CARD.judge(ds)
    assert not verdict.eligible and verdict.note is None
    assert verdict.reason.startswith(f"outside the model's intended population: patient aged {aged} (the model "
                                     f"was trained on ages 1-5: paediatric chest radiographs")
    assert verdict.reason.endswith("set PNEUMOSCREEN_INTENDED_POPULATION=any to screen every age once the site "
                                   "has validated the model on its own films")
    verdict = ANY_AGE.judge(ds)
    assert verdict.eligible and verdict.reason is None
    assert verdict.note == f"outside the intended population: patient aged {aged} (trained on ages 1-5)"


def test_a_film_of_unknown_age_is_screened_with_a_note():
    ds = chest_dataset(PNEUMONIA_JPEG, birth_date=None)
    for policy in (CARD, ANY_AGE):
        verdict = policy.judge(ds)
        assert verdict.eligible
        assert verdict.note == "age unknown: not confirmed within the intended population (ages 1-5)"


def test_the_other_checks_come_first_and_no_reason_names_the_birth_date():
    lateral = CARD.judge(chest_dataset(PNEUMONIA_JPEG, patient_age="045Y", view_position="LL"))
    assert not lateral.eligible and "lateral" in lateral.reason
    adult = CARD.judge(chest_dataset(PNEUMONIA_JPEG, birth_date="19800101"))
    assert "1980" not in adult.reason and "Plantedname" not in adult.reason


def test_a_model_card_without_an_intended_population_screens_every_age_and_a_wrong_one_fails(tmp_path):
    card = json.loads((DEFAULT_MODEL_DIR / CARD_FILE).read_text())
    for name, intended in (("none", {}), ("wrong", {"age_years": {"min": 5, "max": 1}})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / WEIGHTS_FILE).touch()  # the policy reads the card only
        (folder / CARD_FILE).write_text(json.dumps({**card, "intended_population": intended}))
    policy = eligibility_policy(Settings(_env_file=None, model_dir=tmp_path / "none"))
    assert policy.population is None
    verdict = policy.judge(chest_dataset(PNEUMONIA_JPEG, patient_age="045Y"))
    assert verdict.eligible and verdict.note is None
    with pytest.raises(ValueError, match="intended_population"):
        eligibility_policy(Settings(_env_file=None, model_dir=tmp_path / "wrong"))
