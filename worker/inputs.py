"""Files given on the command line (DICOM or PNG/JPEG) to prepared images,
through the same decoding and preprocessing as the listener's path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_io.pixels import PixelDecodeError, display_image
from model.preprocessing import IMAGE_SUFFIXES, prepare, read_image_file


class UnreadableInput(ValueError):
    """A file that is neither a readable image nor a DICOM image."""


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def looks_screenable(path: Path) -> bool:
    """An image file by its suffix, or a DICOM Part 10 file by its 'DICM' prefix."""
    return path.suffix.lower() in IMAGE_SUFFIXES or _is_dicom_file(path)


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named, and the image and DICOM files under folders named (sorted, hidden ones left out)."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*")
                              if p.is_file() and not p.name.startswith(".") and looks_screenable(p))
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def read_any(path: Path) -> np.ndarray:
    """The grey film of a PNG/JPEG or DICOM file, as displayed (before :func:`prepare`)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return read_image_file(path)
        except (OSError, ValueError) as exc:  # the message names the file
            raise UnreadableInput(str(exc)) from exc
    try:
        return display_image(dcmread(path))
    except (InvalidDicomError, PixelDecodeError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise UnreadableInput(f"{path}: {exc}") from exc


def prepare_any(path: Path) -> np.ndarray:
    """The prepared 224x224 uint8 image of a PNG/JPEG or DICOM file."""
    film = read_any(path)
    try:
        return prepare(film)
    except ValueError as exc:  # too small to screen
        raise UnreadableInput(f"{path}: {exc}") from exc
