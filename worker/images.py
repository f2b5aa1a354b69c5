"""From a DICOM dataset or file, or a PNG/JPEG, to the film as displayed and to the model's
input: one path for the pipeline, the heatmaps sent to the PACS and the command line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import BytesLengthException, InvalidDicomError

from dicom_io.pixels import PixelDecodeError, display_image
from model.preprocessing import IMAGE_SUFFIXES, INPUT_SIZE, PREPROCESSING_VERSION, prepare, read_image_file


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


def display_film(source: Path | Dataset) -> np.ndarray:
    """The grey film as a viewer displays it (before :func:`prepare`), of a DICOM dataset, a DICOM
    file or a PNG/JPEG file; ``UnreadableInput`` says why not."""
    if isinstance(source, Dataset):
        try:
            return display_image(source)
        except (PixelDecodeError, BytesLengthException, ValueError, TypeError, AttributeError) as exc:
            raise UnreadableInput(str(exc) or type(exc).__name__) from exc
    path = Path(source)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            return read_image_file(path)
        except (OSError, ValueError) as exc:  # the message names the file
            raise UnreadableInput(str(exc)) from exc
    try:
        return display_image(dcmread(path))
    except (InvalidDicomError, BytesLengthException, PixelDecodeError, OSError, ValueError, TypeError,
            AttributeError) as exc:
        raise UnreadableInput(f"{path}: {exc}") from exc


def prepare_film(source: Path | Dataset, size: int = INPUT_SIZE,
                 version: str = PREPROCESSING_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """The one way from a received file, a dataset or an image file to the model's input: the film
    as displayed and its prepared ``size`` x ``size`` uint8 image (the model card's ``input_size``
    and ``preprocessing_version``). ``UnreadableInput`` says why not."""
    film = display_film(source)
    try:
        return film, prepare(film, size, version)
    except ValueError as exc:  # too small to screen
        where = "" if isinstance(source, Dataset) else f"{source}: "
        raise UnreadableInput(f"{where}{exc}") from exc
