"""The one preprocessing path shared by training and serving.

Every image, whether it came from a DICOM file (after ``dicom_io.pixels``
turned it into display-ready 8-bit grey) or from a PNG/JPEG file, goes
through :func:`prepare` to become a 224x224 ``uint8`` array: resized, then
its contrast normalised (:func:`normalize_contrast`). That array is what is
cached for training and what travels to the inference workers, so training
and serving see byte-identical tensors for the same image.
:func:`to_model_input` then makes the network input: 3 channels (RGB,
grey replicated), float32 scaled to [0, 1].

This module imports nothing from the rest of the project.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: The version a model card that names none, and :func:`prepare` called without one, get. Each
#: card names the version it was trained with (``preprocessing_version``), and serving prepares
#: every film for that model at that version, so training and serving stay byte-identical.
PREPROCESSING_VERSION = "2"

#: Version "1" was the resize alone; "2" added :func:`normalize_contrast`; "3" crops each film to
#: its content and then to a square before both (:func:`frame_crop`), so the network never sees
#: the frame's proportions. A version, once released, never changes what it produces.

#: The versions :func:`prepare` can produce.
VERSIONS = ("2", "3")

#: Version "3": grey levels at or below this are background when finding a film's content bounds.
BACKGROUND_LEVEL = 0

#: Side of the square network input, in pixels.
INPUT_SIZE = 224

#: File suffixes read as plain images (everything else is treated as DICOM).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def prepare(image: np.ndarray, size: int = INPUT_SIZE, version: str = PREPROCESSING_VERSION) -> np.ndarray:
    """Return the ``size`` x ``size`` ``uint8`` grey image the network is fed from.

    Parameters
    ----------
    image:
        A 2-D grey image or a 3-D ``(rows, columns, 3|4)`` image in OpenCV's
        BGR(A) order, ``uint8``. Display-ready: a DICOM image must already
        have had its modality/VOI LUTs applied and MONOCHROME1 inverted.
    size:
        Output side in pixels.
    version:
        One of :data:`VERSIONS`, the model card's ``preprocessing_version``; "3" first applies
        :func:`frame_crop`. The default is :data:`PREPROCESSING_VERSION`.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown preprocessing version {version!r}, expected one of {VERSIONS}")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 (display-ready), got {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        image = cv2.cvtColor(image, code)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D grey or 3-D colour, got shape {image.shape}")
    if min(image.shape) < 2:
        raise ValueError(f"image is too small to screen: {image.shape[1]}x{image.shape[0]}")
    if version == "3":
        image = frame_crop(image)
    interpolation = cv2.INTER_AREA if min(image.shape) >= size else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interpolation)
    return normalize_contrast(np.ascontiguousarray(out, dtype=np.uint8))


def frame_crop(image: np.ndarray) -> np.ndarray:
    """Version "3"'s crop of a 2-D ``uint8`` grey film: to the bounds of its content (the rows and
    columns holding a level above :data:`BACKGROUND_LEVEL`, so a black border or padding goes),
    then to the centre square of those bounds (the longer axis cut on both sides). The same film
    padded with black to any proportions gives the same crop. A film with no content, or content
    under 2 pixels thick, is returned unchanged."""
    top, left, height, width = crop_box(image)
    if (height, width) == image.shape[:2]:
        return image
    return np.ascontiguousarray(image[top:top + height, left:left + width])


def crop_box(image: np.ndarray, version: str = "3") -> tuple[int, int, int, int]:
    """``(top, left, height, width)``: the region of the 2-D grey film ``image`` that :func:`prepare`
    at ``version`` resizes to the network's square, in the film's own pixels. The whole film for
    versions before "3"; :func:`frame_crop`'s square for "3". A heat map computed on the prepared
    image belongs on this region of the film as displayed."""
    whole = (0, 0, int(image.shape[0]), int(image.shape[1]))
    if version != "3":
        return whole
    foreground = image > BACKGROUND_LEVEL
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    if rows.size < 2 or cols.size < 2:
        return whole
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = min(bottom - top, right - left)
    return top + (bottom - top - side) // 2, left + (right - left - side) // 2, side, side


def normalize_contrast(image: np.ndarray) -> np.ndarray:
    """Global histogram equalization of a 2-D ``uint8`` grey image.

    The grey levels are remapped by their cumulative histogram, so the result
    does not depend on which monotonic display curve (exposure, gamma, VOI
    window, a JPEG export's tone curve) the film went through before, up to
    the levels that curve merged or clipped. A constant image is returned
    unchanged.
    """
    return cv2.equalizeHist(image)


def prepared_batch(batch: np.ndarray) -> np.ndarray:
    """``batch`` as prepared ``uint8`` images ``(n, size, size)`` (one image gets a batch axis);
    ValueError for anything else."""
    batch = np.asarray(batch)
    if batch.ndim == 2:
        batch = batch[np.newaxis]
    if batch.ndim != 3 or batch.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape (n, size, size), got {batch.dtype} {batch.shape}"
        )
    return batch


def to_model_input(batch: np.ndarray) -> np.ndarray:
    """Turn prepared ``uint8`` images ``(n, size, size)`` into the network input.

    Returns ``float32`` of shape ``(n, size, size, 3)`` in [0, 1], the grey
    channel replicated into R, G and B.
    """
    scaled = prepared_batch(batch).astype(np.float32) / np.float32(255.0)
    return np.repeat(scaled[..., np.newaxis], 3, axis=-1)


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG (or other OpenCV-readable) file as ``uint8`` grey."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: not a readable image file")
    return image


def prepare_file(path: str | Path, size: int = INPUT_SIZE, version: str = PREPROCESSING_VERSION) -> np.ndarray:
    """:func:`read_image_file` then :func:`prepare`."""
    return prepare(read_image_file(path), size, version)
