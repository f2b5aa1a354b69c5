"""The reference input statistics of a model's training films, written beside its weights
(``reference_inputs.json``) for the drift check (``model.drift``).

Each film of ``train/{NORMAL,PNEUMONIA}/`` of each training folder gives its frame proportions,
size and mean grey level. A folder whose ``MANIFEST.tsv`` has ``orig_width``/``orig_height``
columns (a downsampled copy) gives the size of the original film; the grey level and the
proportions, which a resize keeps, come from the file. ``python -m model.reference DATA... --out
DIR`` writes it for an artifact made before training wrote it.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from model.drift import FilmInput, write_reference_inputs
from model.preprocessing import read_image_file

log = logging.getLogger(__name__)
CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _original_sizes(folder: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """``(class, file name) -> (rows, columns)`` of the original films, from a MANIFEST.tsv that has them."""
    manifest = folder / "MANIFEST.tsv"
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not {"orig_width", "orig_height", "class", "filename", "split"} <= set(reader.fieldnames or ()):
            return {}
        return {(row["class"], row["filename"]): (int(row["orig_height"]), int(row["orig_width"]))
                for row in reader if row["split"] == "train"}


def training_films(data_dirs: Sequence[Path]) -> Iterator[FilmInput]:
    """A :class:`FilmInput` per training film of ``data_dirs`` (a film in several counts once, by name)."""
    seen: set[tuple[str, str]] = set()
    for folder in map(Path, data_dirs):
        sizes = _original_sizes(folder)
        for cls in CLASSES:
            for path in sorted((folder / "train" / cls).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES or (cls, path.name) in seen:
                    continue
                seen.add((cls, path.name))
                image = read_image_file(path)
                rows, columns = sizes.get((cls, path.name), image.shape[:2])
                yield FilmInput(rows=rows, columns=columns, brightness=float(image.mean()))


def write_training_reference(data_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write the reference input statistics of the training films of ``data_dirs`` into ``out_dir``."""
    films = list(training_films(data_dirs))
    path = write_reference_inputs(films, out_dir, source=", ".join(map(str, data_dirs)) + " (train/)")
    log.info("wrote %s: input statistics of %d training films", path, len(films))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="Kaggle-layout training folders (train/NORMAL, train/PNEUMONIA)")
    parser.add_argument("--out", required=True, type=Path, help="the model artifact folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_training_reference(args.data, args.out)


if __name__ == "__main__":
    main()
