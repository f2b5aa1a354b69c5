"""Copies of a received film's attributes with only the values valid for their VR.

A modality may send a Patient's Age of ``51`` (no unit) or a date of ``2023``; what we create
from its header (the SR, the heatmap SC) must not carry them. ``valid_copy`` checks each value
with pydicom's own validators, at any depth of sequences, without converting the element through
pydicom's reader (which would log the invalid value, patient data included): an attribute with an
invalid value is left out, and named (keyword, tag, VR: never its value) in what it returns.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pydicom import config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import validate_value
from pydicom.values import TEXT_VR_DELIMS

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})
"""VRs whose values pydicom's validators check; binary VRs are checked by their length only, as pydicom does."""
_ONE_VALUE = frozenset({"LT", "ST", "UT", "UR"})
"""Text VRs whose value may hold a backslash."""


@dataclass(frozen=True, order=True)
class LeftOut:
    """An attribute left out of a copy, named without its value."""

    keyword: str
    tag: str
    VR: str


def valid_copy(ds: Dataset, *, below_group: int = 0x7FE0) -> tuple[Dataset, set[LeftOut]]:
    """``ds``'s attributes of groups below ``below_group`` (by default: all but the pixel data),
    each only if every value in it is valid for its VR; and those left out."""
    left_out: set[LeftOut] = set()
    return _copy(ds, _encodings(ds, ["iso8859"]), below_group, left_out), left_out


def _encodings(ds: Dataset, inherited: list[str]) -> list[str]:
    raw = ds.get_item(0x00080005)
    if raw is None:
        return inherited
    try:
        terms = raw.value.decode("ascii").strip(" \0").split("\\") if isinstance(raw.value, bytes) else raw.value
        return convert_encodings(terms)
    except (UnicodeDecodeError, LookupError, ValueError, TypeError):
        return inherited


def _copy(ds: Dataset, encodings: list[str], below_group: int, left_out: set[LeftOut]) -> Dataset:
    copy = Dataset()
    for tag in ds.keys():
        if Tag(tag).group >= below_group:
            continue
        element = ds.get_item(tag)
        vr = _vr_of(element)
        if vr == "SQ":
            items = ds[tag].value  # a sequence's own bytes hold no value to validate; its items' do
            copy[tag] = DataElement(tag, "SQ", Sequence(
                [_copy(item, _encodings(item, encodings), 0x10000, left_out) for item in items]))
        elif vr in _TEXT_VRS and not Tag(tag).is_private and not _valid(element, vr, encodings):
            left_out.add(LeftOut(keyword_for_tag(tag) or str(Tag(tag)), str(Tag(tag)), vr))
        else:
            copy[tag] = element
    return copy


def _vr_of(element: DataElement | RawDataElement) -> str:
    if element.VR:
        return str(element.VR)
    try:
        return dictionary_VR(element.tag)
    except KeyError:  # a private or unknown tag read in implicit VR
        return "UN"


def _valid(element: DataElement | RawDataElement, vr: str, encodings: list[str]) -> bool:
    try:
        for value in _values(element, vr, encodings):
            validate_value(vr, value, config.RAISE)
    except (ValueError, UnicodeDecodeError, LookupError):  # the message holds the value: it is not passed on
        return False
    return True


def _values(element: DataElement | RawDataElement, vr: str, encodings: list[str]) -> list:
    value = element.value
    if value is None:
        return []
    if isinstance(element, RawDataElement) or isinstance(value, bytes):
        text = decode_bytes(value, encodings, TEXT_VR_DELIMS) if isinstance(value, bytes) else str(value)
        parts = [text] if vr in _ONE_VALUE else text.split("\\")
        return [part.rstrip("\0 ") for part in parts if part.rstrip("\0 ")]
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    # a date or time object set in memory is written correctly by pydicom whatever its text was
    return [getattr(v, "original_string", None) or str(v) for v in values
            if v not in (None, "") and not (isinstance(v, (datetime.date, datetime.time))
                                             and not getattr(v, "original_string", None))]
