"""Reading Kaggle-layout chest X-ray folders (``{NORMAL,PNEUMONIA}/``) through
the shared preprocessing, combining several (a film in more than one counts
once), and splitting by patient."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.preprocessing import IMAGE_SUFFIXES, INPUT_SIZE, PREPROCESSING_VERSION, prepare, read_image_file

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")

# IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg -> IM-0115, NORMAL2-IM-1427;
# person1689_bacteria_4474.jpeg -> person1689
_PATIENT_PATTERNS = (
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),
    re.compile(r"^(person\d+)_"),
)


def patient_id(filename: str) -> str:
    """The patient key in a Kermany/Kaggle file name (the file stem if none is found)."""
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(filename)
        if m:
            return m.group(1)
    return Path(filename).stem


@dataclass
class LabelledImages:
    """Prepared images with labels (1 = PNEUMONIA) and patient keys."""

    images: np.ndarray  # (n, size, size) uint8
    labels: np.ndarray  # (n,) int
    patients: np.ndarray  # (n,) str
    paths: list[Path]
    aspects: np.ndarray  # (n,) float: width / height of each film before the square resize

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "LabelledImages":
        return LabelledImages(self.images[index], self.labels[index], self.patients[index],
                              [self.paths[i] for i in index], self.aspects[index])


def list_images(folder: str | Path) -> list[tuple[Path, int]]:
    """``(path, label)`` for every image under ``folder/NORMAL`` and ``folder/PNEUMONIA``."""
    folder = Path(folder)
    found = []
    for label, cls in enumerate(CLASSES):
        class_dir = folder / cls
        if not class_dir.is_dir():
            raise FileNotFoundError(f"{folder}: expected a {cls}/ sub-folder")
        found += [(p, label) for p in sorted(class_dir.iterdir())
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return found


def load_folder(folder: str | Path, *, size: int = INPUT_SIZE, cache: str | Path | None = None,
                progress: bool = True, version: str = PREPROCESSING_VERSION) -> LabelledImages:
    """Load and prepare every image of a Kaggle-layout folder at preprocessing ``version`` (cached
    as .npz if asked).

    A cache is used only if it holds the same files at the same size, prepared
    by the same preprocessing version; otherwise it is rebuilt.
    """
    entries = list_images(folder)
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            if ("preprocessing" in z.files and str(z["preprocessing"]) == version
                    and "aspects" in z.files
                    and list(z["names"]) == [str(p) for p, _ in entries] and z["images"].shape[1] == size):
                log.info("using cached arrays %s", cache)
                return LabelledImages(z["images"], z["labels"], z["patients"], [p for p, _ in entries],
                                      z["aspects"])
            log.info("cached arrays %s are stale (other files, size, preprocessing or no proportions); rebuilding", cache)
    images = np.empty((len(entries), size, size), dtype=np.uint8)
    aspects = np.empty(len(entries), dtype=np.float32)
    for i, (path, _) in enumerate(entries):
        grey = read_image_file(path)
        aspects[i] = grey.shape[1] / grey.shape[0]
        images[i] = prepare(grey, size, version)
        if progress and (i + 1) % 500 == 0:
            log.info("read %d/%d images of %s", i + 1, len(entries), folder)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    patients = np.array([patient_id(p.name) for p, _ in entries])
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels, patients=patients, aspects=aspects,
                 names=np.array([str(p) for p, _ in entries]), preprocessing=np.array(version))
    return LabelledImages(images, labels, patients, [p for p, _ in entries], aspects)


def combine(parts: list[LabelledImages]) -> LabelledImages:
    """Several loaded folders as one training set. A film present in more than one (the same class
    and file name: two copies of one release) counts once, from the first folder that has it, so
    that copies of one film never land on both sides of a split."""
    if not parts:
        raise ValueError("no folder to combine")
    seen: set[tuple[int, str]] = set()
    kept: list[LabelledImages] = []
    for part in parts:
        index = []
        for i, (path, label) in enumerate(zip(part.paths, part.labels)):
            key = (int(label), Path(path).name)
            if key not in seen:
                seen.add(key)
                index.append(i)
        if len(index) < len(part):
            log.info("%d of %d films are already in an earlier folder; kept once", len(part) - len(index), len(part))
        kept.append(part.subset(np.array(index, dtype=np.int64)))
    return LabelledImages(np.concatenate([p.images for p in kept]), np.concatenate([p.labels for p in kept]),
                          np.concatenate([p.patients for p in kept]), [path for p in kept for path in p.paths],
                          np.concatenate([p.aspects for p in kept]))


def patient_split(data: LabelledImages, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): whole patients on one side, stratified by class."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(data)), data.labels, groups=data.patients))
    return train_idx, val_idx
