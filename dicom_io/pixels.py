"""From a DICOM dataset to the display-ready 8-bit grey image a radiologist's
viewer would show, ready for ``model.preprocessing.prepare``.

Order of operations (PS3.4 N.2): modality LUT / rescale, VOI LUT or window,
then presentation: MONOCHROME1, or a Presentation LUT Shape of INVERSE, is
inverted (once) so that air is black.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing


class PixelDecodeError(ValueError):
    """The pixel data could not be decoded into an image."""


#: Larger images are refused before decoding (a radiograph is at most ~45 Mpixel).
MAX_PIXELS = 100_000_000

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}


def _first_frame(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise PixelDecodeError("no Pixel Data in the dataset")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise PixelDecodeError(f"Rows/Columns/SamplesPerPixel missing or invalid: {exc}") from exc
    if rows < 1 or columns < 1:
        raise PixelDecodeError(f"invalid image size {columns}x{rows}")
    if rows * columns * samples > MAX_PIXELS:
        raise PixelDecodeError(f"image {columns}x{rows}x{samples} exceeds {MAX_PIXELS} pixels")
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            from pydicom.pixels import pixel_array

            return pixel_array(ds, index=0)
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types on a bad codestream
        raise PixelDecodeError(f"pixel data could not be decoded: {type(exc).__name__}: {exc}") from exc
    return arr


def _padding_mask(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels outside the image proper (PixelPaddingValue, up to PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in ds or arr.ndim != 2:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    mask = (arr >= min(a, b)) & (arr <= max(a, b))
    return mask if mask.any() and not mask.all() else None


def _to_uint8(values: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """Stretch min..max to 0..255 (the image's own range; padding left out of it)."""
    inside = values if ignore is None else values[~ignore]
    lo, hi = float(inside.min()), float(inside.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT Sequence or window center/width, onto the full 8-bit output range."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = apply_voi(values, ds, index=0).astype(np.float64)
        return np.clip(np.rint(out * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    # windowing onto 0..255: the window attributes on an 8-bit unsigned view
    view = Dataset()
    view.BitsStored, view.PixelRepresentation, view.PhotometricInterpretation = 8, 0, "MONOCHROME2"
    view.WindowCenter, view.WindowWidth = ds.WindowCenter, ds.WindowWidth
    if "VOILUTFunction" in ds:
        view.VOILUTFunction = ds.VOILUTFunction
    out = apply_windowing(values.astype(np.float64), view, index=0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _windowed_by_table(arr: np.ndarray, ds: Dataset, has_rescale: bool) -> np.ndarray:
    """Modality LUT + VOI for integer pixels, computed once per stored value present
    (a table of at most 65,536 entries) and then looked up: the same values as
    applying them to every pixel, ten times faster on a radiograph."""
    # unsigned pixels index a table that starts at 0 (at most 65,536 entries): no pass over the
    # image to offset them; signed ones are offset from their minimum
    lo = 0 if arr.dtype.kind == "u" else int(arr.min())
    hi = int(arr.max())
    domain = np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)
    values = apply_modality_lut(domain, ds) if has_rescale else domain
    table = _apply_voi(values, ds)
    return np.take(table, arr if lo == 0 else arr.astype(np.int32) - lo)


def display_image(ds: Dataset) -> np.ndarray:
    """The first frame of ``ds`` as display-ready ``uint8`` grey (rows, columns)."""
    arr = _first_frame(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, AttributeError, KeyError) as exc:
            raise PixelDecodeError(f"palette colour lookup failed: {exc}") from exc
    if photometric in _COLOUR or arr.ndim == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise PixelDecodeError(f"unexpected colour pixel shape {arr.shape}")
        # pydicom returns YBR as RGB; ITU-R BT.601 luma
        grey = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else _to_uint8(grey)
    if arr.ndim != 2:
        raise PixelDecodeError(f"unexpected pixel shape {arr.shape}")

    padding = _padding_mask(arr, ds)
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if arr.dtype == np.uint8 and not has_rescale and not has_voi:
        image = arr  # already display-ready 8-bit: keep the exact values
    else:
        try:
            if has_voi and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
                image = _windowed_by_table(arr, ds, has_rescale)
            else:
                values = apply_modality_lut(arr, ds) if has_rescale else arr
                image = _apply_voi(values, ds) if has_voi else _to_uint8(np.asarray(values), padding)
        except (ValueError, TypeError, IndexError, AttributeError, ZeroDivisionError) as exc:
            raise PixelDecodeError(f"modality/VOI LUT could not be applied: {exc}") from exc
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        # DX writes INVERSE beside MONOCHROME1 for the same inversion: applied once either way
        image = 255 - image
    if padding is not None:
        image = np.where(padding, np.uint8(0), image)  # padding shows as black background
    return np.ascontiguousarray(image, dtype=np.uint8)
