"""No patient value reaches a log line through pydicom's own warnings about invalid values."""

from __future__ import annotations

import logging
import warnings

from pydicom import Dataset

from worker.cli.context import WithheldValues


def _records(logger_name: str) -> list[logging.LogRecord]:
    caught: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            caught.append(record)

    handler = Keep()
    handler.addFilter(WithheldValues())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Dataset().PatientAge = "51"
            Dataset().PatientBirthDate = "19XX0101"
    finally:
        logger.removeHandler(handler)
    return caught


def test_pydicom_warnings_about_invalid_values_withhold_the_value(invalid_dicom_allowed):
    records = _records("pydicom")
    assert records, "pydicom warned about the invalid values"
    lines = [r.getMessage() for r in records]
    assert all("51" not in line and "19XX0101" not in line for line in lines), lines
    assert any("Invalid value for VR AS" in line and "<value withheld>" in line for line in lines), lines


def test_other_loggers_are_left_as_they_are():
    record = logging.LogRecord("pneumoscreen", logging.INFO, __file__, 1, "study %s 'quoted'", ("1.2.3",), None)
    assert WithheldValues().filter(record) and record.getMessage() == "study 1.2.3 'quoted'"
