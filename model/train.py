"""Training: Kaggle-layout folder in, model artifact out.

Images are read once through the shared preprocessing and cached as uint8
arrays; the validation set is carved from ``train/`` by patient (the
official ``val/`` split has 16 images, too few to choose a threshold on, so
it is only reported). The threshold is set on validation for the target
sensitivity and written into the model card with the validation figures.

With ``folds`` set, the same recipe first goes through the k-fold check of
:mod:`model.validation` (clean and acquisition-shifted figures, with their
spread over folds), which is written into the card beside them.

With ``members`` set, the recipe is an ensemble: one network per augmentation,
trained on the same films with the same split, served as one model (the mean of
their logits through one calibrated output, :func:`model.network.build_ensemble`);
the folds and the operating point score the ensemble as it is served.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.artifact import ModelCard, save_artifact
from model.augment import AUGMENTATIONS
from model.dataset import LabelledImages, combine, load_folder, patient_split
from model.metrics import binary_report, curves, spread, threshold_for_sensitivity
from model.operating_point import (
    HELD_OUT_FILE,
    Platt,
    calibration_figures,
    fit_platt,
    fold_into_dense,
    save_held_out,
    transferable_threshold,
)
from model.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION, VERSIONS, to_model_input
from model.reference import write_training_reference

log = logging.getLogger(__name__)


#: The population of the Kermany films (Kermany et al., Cell 2018): what the card says the model is for.
KERMANY_POPULATION = {
    "description": "paediatric chest radiographs, anterior-posterior, of children aged one to five, "
                   "from routine clinical care at one hospital",
    "age_years": {"min": 1, "max": 5},
    "views": ["AP"],
    "source": "Guangzhou Women and Children's Medical Center (Kermany et al., Cell 2018)",
}


#: Which weights a run keeps (:attr:`TrainingConfig.average`).
AVERAGES = ("best", "swa", "ema")

#: How a run chooses its threshold (:attr:`TrainingConfig.operating_point`).
OPERATING_POINTS = ("margin", "pooled")

#: Training batches over which averaged weights get their batch-norm statistics.
BN_BATCHES = 60


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    val_fraction: float = 0.2
    target_sensitivity: float = 0.97
    patience: int = 6
    seed: int = 1234
    input_size: int = INPUT_SIZE
    name: str = "pneumoscreen-cnn"
    version: str = "0.1.0"
    augmentation: str = "standard"
    #: The augmentations of an ensemble's members (at least two, one network each, trained on the same
    #: films with the same seed); empty: one network, trained with ``augmentation``.
    members: tuple[str, ...] = ()
    label_smoothing: float = 0.0
    stretch: float = 0.0
    #: Which weights the run keeps: ``best``, the epoch of highest validation AUC; ``swa``, the mean
    #: of the last ``average_epochs`` epochs' weights; ``ema``, the optimizer's moving average of the
    #: weights of every step (momentum ``ema``). Averaged weights get batch-norm statistics of their own.
    average: str = "best"
    average_epochs: int = 4
    ema: float = 0.995
    folds: int = 0
    #: How the threshold is chosen on the held-out sets (:func:`model.operating_point.transferable_threshold`):
    #: ``margin``, for the design sensitivity at which the target holds on sets it was not chosen on;
    #: ``pooled``, for the target itself on the pooled sets.
    operating_point: str = "margin"
    #: Weight the training films so that within each band of width / height the classes keep their
    #: overall proportions (:func:`model.frame.frame_balance_weights`): the frame carries no label.
    balance_frame: bool = False
    #: The preprocessing version the films are prepared at (:data:`model.preprocessing.VERSIONS`),
    #: written on the card; serving prepares every film for this model at it.
    preprocessing: str = PREPROCESSING_VERSION

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if self.preprocessing not in VERSIONS:
            raise ValueError(f"preprocessing must be one of {VERSIONS}, got {self.preprocessing!r}")
        for augmentation in (self.augmentation, *self.members):
            if augmentation not in AUGMENTATIONS:
                raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
        if len(self.members) == 1:
            raise ValueError("an ensemble needs at least two members; for one network give its augmentation")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must lie in [0, 0.5)")
        if not 0.0 <= self.stretch <= 0.5:
            raise ValueError("stretch must lie in [0, 0.5]")
        if self.average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {self.average!r}")
        if not 1 <= self.average_epochs <= self.epochs and self.average == "swa":
            raise ValueError(f"average_epochs must lie in [1, epochs={self.epochs}]")
        if not 0.5 <= self.ema < 1.0:
            raise ValueError("ema must be a momentum in [0.5, 1)")
        if self.folds == 1 or self.folds < 0:
            raise ValueError("folds must be 0 (no k-fold check) or at least 2")
        if not 0.05 <= self.val_fraction <= 0.5:
            raise ValueError("val_fraction must lie in [0.05, 0.5]")
        if not 0.5 <= self.target_sensitivity < 1.0:
            raise ValueError("target_sensitivity must lie in [0.5, 1)")
        if self.operating_point not in OPERATING_POINTS:
            raise ValueError(f"operating_point must be one of {OPERATING_POINTS}, got {self.operating_point!r}")

    @property
    def networks(self) -> tuple[str, ...]:
        """The augmentation of each network the recipe trains (one, unless an ensemble)."""
        return self.members or (self.augmentation,)

    @property
    def augmentation_name(self) -> str:
        """The recipe's augmentation as the card names it (``acquisition+framing`` for an ensemble)."""
        return "+".join(self.networks)


def _manifest_hash(data: LabelledImages) -> str:
    digest = hashlib.sha256()
    for path, label in zip(data.paths, data.labels):
        digest.update(f"{label}\t{Path(path).name}\n".encode())
    return digest.hexdigest()


def _dataset(images: np.ndarray, labels: np.ndarray, *, batch_size: int, shuffle: bool, seed: int,
             augmentation: str = "standard", aspects: np.ndarray | None = None,
             weights: np.ndarray | None = None):
    """Batches of network input. ``framing`` needs ``aspects``: each film's
    proportions, reframed to proportions drawn from all of them. With ``weights``, each
    batch carries them as Keras sample weights ``(x, y, w)``."""
    import tensorflow as tf

    from model.augment import acquisition_augment

    if augmentation == "framing" and aspects is None:
        raise ValueError("the framing augmentation needs the films' aspects")
    if aspects is None:
        aspects = np.ones(len(labels), dtype=np.float32)
    pool = tf.constant(np.asarray(aspects, dtype=np.float32))

    def to_input(x, y, aspect, *w):
        x = tf.cast(x, tf.float32)[..., None] / 255.0
        if augmentation == "acquisition":
            x = acquisition_augment(x)
        elif augmentation == "framing":
            x = acquisition_augment(x, aspect, pool)
        return (tf.repeat(x, 3, axis=-1), y, *w)

    columns = (images, labels.astype(np.float32), np.asarray(aspects, np.float32))
    ds = tf.data.Dataset.from_tensor_slices(columns if weights is None else
                                            (*columns, np.asarray(weights, np.float32)))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(to_input, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_prepared(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Scores for prepared uint8 images, in batches."""
    out = [np.asarray(model(to_model_input(images[i:i + batch_size]), training=False)).reshape(-1)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty(0)


def serving_copy(models: list, input_size: int):
    """The trained network without its augmentation layers and optimizer state (same weights,
    same outputs, a smaller file); for several networks, their ensemble as one model
    (:func:`model.network.build_ensemble`), its output the sigmoid of their mean logit."""
    from model.network import build_ensemble, build_network

    if len(models) > 1:
        return build_ensemble(models)
    serving = build_network(input_size, augment=False)
    serving.set_weights(models[0].get_weights())
    return serving


class _EpochSnapshots:
    """Keeps the weights at the end of each of the last ``keep`` epochs."""

    def __init__(self, keep: int):
        import keras

        outer = self
        self.keep, self.weights = keep, []

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                outer.weights = (outer.weights + [[w.copy() for w in self.model.get_weights()]])[-outer.keep:]

        self.callback = Callback()

    def mean(self) -> list[np.ndarray]:
        return [np.mean([snapshot[j] for snapshot in self.weights], axis=0) for j in range(len(self.weights[0]))]


def recalibrate_batch_norm(model, dataset, *, batches: int = BN_BATCHES) -> int:
    """Re-estimate every BatchNormalization layer's moving mean and variance as the plain
    average over ``batches`` batches of ``dataset``, the network in training mode (its
    augmentation acting, as in training). Averaged weights need this: the statistics the
    last training step left belong to other weights, and with them the averaged network's
    activations drift (measured: validation AUC 0.50). Returns the batches used."""
    import keras

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    used = 0
    try:
        for used, (x, *_) in enumerate(dataset.take(batches), start=1):
            for layer in layers:
                layer.momentum = (used - 1) / used  # a running mean: batch k weighs 1/k
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return used


def fit_network(tr: LabelledImages, va: LabelledImages, config: TrainingConfig):
    """Train the network on ``tr`` and return (model, facts about the run).

    ``config.average`` says which weights come back: ``best`` stops early on (and restores
    the epoch of highest) validation AUC on ``va``; ``swa`` and ``ema`` run every epoch and
    return averaged weights (the mean of the last epochs', or the optimizer's moving average),
    their batch-norm statistics re-estimated on training batches, so that ``va`` chooses nothing."""
    import keras

    from model.network import build_network

    keras.utils.set_random_seed(config.seed)
    counts = np.bincount(tr.labels, minlength=2)
    class_weight = {c: float(len(tr) / (2 * counts[c])) for c in (0, 1)}
    steps = int(np.ceil(len(tr) / config.batch_size)) * config.epochs
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps, alpha=0.05)
    model = build_network(config.input_size, stretch=config.stretch)
    moving = {"use_ema": True, "ema_momentum": config.ema} if config.average == "ema" else {}
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, **moving),
                  loss=keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=[keras.metrics.AUC(name="auc")])
    snapshots = _EpochSnapshots(config.average_epochs)
    if config.average == "best":
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=config.patience,
                                                   restore_best_weights=True, verbose=1)]
    else:
        callbacks = [snapshots.callback] if config.average == "swa" else []
    sample_weights = _frame_weights(tr, class_weight) if config.balance_frame else None
    training = _dataset(tr.images, tr.labels, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                        augmentation=config.augmentation, aspects=tr.aspects, weights=sample_weights)
    started = time.monotonic()
    history = model.fit(
        training, validation_data=_dataset(va.images, va.labels, batch_size=64, shuffle=False, seed=config.seed),
        epochs=config.epochs, class_weight=None if config.balance_frame else class_weight, callbacks=callbacks,
        verbose=2,
    )
    epochs_run = len(history.history["loss"])
    facts = {"epochs_run": epochs_run, "best_epoch": int(np.argmax(history.history["val_auc"])) + 1}
    if config.average == "best":
        facts["weights"] = f"epoch {facts['best_epoch']}, of highest validation AUC"
    else:
        if config.average == "swa":  # an "ema" run ends with the moving average in the weights
            model.set_weights(snapshots.mean())
            facts["weights"] = f"mean of epochs {epochs_run - len(snapshots.weights) + 1}-{epochs_run}"
        else:
            facts["weights"] = f"moving average of every step's weights, momentum {config.ema}"
        facts["batch_norm_batches"] = recalibrate_batch_norm(model, training)
    seconds = time.monotonic() - started
    facts.update({"seconds": round(seconds, 1), "images_per_second": round(len(tr) * epochs_run / seconds, 1),
                  "class_weight": class_weight})
    return model, facts


def _frame_weights(tr: LabelledImages, class_weight: dict[int, float]) -> np.ndarray:
    """Each training film's sample weight under ``balance_frame``: its class weight times the weight
    that gives its width / height band the overall class balance (Keras takes class weights or
    sample weights, not both). Squashed copies, whose proportions are lost, are one group more."""
    from model.frame import frame_balance_weights, known_aspects

    balance = frame_balance_weights(tr.labels, known_aspects(tr.aspects))
    return balance * np.where(tr.labels == 1, class_weight[1], class_weight[0])


def fit_recipe(tr: LabelledImages, va: LabelledImages, config: TrainingConfig):
    """Train every network of the recipe (:attr:`TrainingConfig.networks`) on ``tr`` and return
    (the served model, facts about the run). The served model has no augmentation layers; for an
    ensemble the facts keep each member's under ``members``."""
    models, runs = [], []
    for augmentation in config.networks:
        if len(config.networks) > 1:
            log.info("ensemble member %d/%d: %s augmentation", len(models) + 1, len(config.networks), augmentation)
        model, facts = fit_network(tr, va, replace(config, augmentation=augmentation, members=()))
        models.append(model)
        runs.append(facts)
    if len(runs) == 1:
        return serving_copy(models, config.input_size), runs[0]
    seconds = sum(run["seconds"] for run in runs)
    return serving_copy(models, config.input_size), {
        "members": [{"augmentation": augmentation, **facts} for augmentation, facts in zip(config.networks, runs)],
        "combination": "the mean of the members' logits, through one calibrated sigmoid output",
        "seconds": round(seconds, 1),
        "images_per_second": round(sum(len(tr) * run["epochs_run"] for run in runs) / seconds, 1),
    }


def kfold_check(full: LabelledImages, config: TrainingConfig, *, k: int) -> dict:
    """The k-fold check of :mod:`model.validation` for this recipe: each fold
    trained as the final model is, the held-out fold serving as its validation."""
    from model.validation import cross_validate, shifted_images

    started = time.monotonic()
    shifted = shifted_images(full.paths, size=config.input_size, version=config.preprocessing)

    def fit(train_idx: np.ndarray, held_out_idx: np.ndarray, fold: int):
        model, facts = fit_recipe(full.subset(train_idx), full.subset(held_out_idx), config)
        return (lambda images: predict_prepared(model, images)), facts

    result = cross_validate(full.images, full.labels, full.patients, shifted, fit, k=k, seed=config.seed,
                            target_sensitivity=config.target_sensitivity)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def card_sections(check: dict) -> dict:
    """The check's figures for the model card's ``validation``: ``cross_validation``
    (clean, per fold and spread) and ``shifted`` (per perturbation, mean, worst)."""
    summary = check["summary"]
    return {
        "cross_validation": {
            "method": f"{check['k']}-fold by patient, stratified, seed {check['seed']}; threshold for "
                      f"sensitivity {check['target_sensitivity']} chosen on each clean held-out fold",
            "folds": check["k"], "threshold": summary["threshold"], **summary["clean"],
            "training_seconds": check["seconds"],
        },
        "shifted": {
            "method": "held-out folds through deterministic acquisition perturbations before prepare(), "
                      "scored at the clean fold's threshold",
            "perturbations": summary["shifted"], "mean": summary["shifted_mean"], "worst": summary["shifted_worst"],
        },
    }


def frame_card_section(check: dict, full: LabelledImages) -> dict:
    """The check's frame dependence for the card's ``validation.frame_dependence``: on every
    held-out fold, at the fold's threshold, the within-class Spearman correlation of the logit with
    the film's width / height and the figures per band (:func:`model.frame.frame_dependence`), and
    their worst over folds. Squashed copies (their proportions lost) are left out and counted."""
    from model.frame import BAND_EDGES, frame_dependence, known_aspects, summarize, to_logit

    folds = [frame_dependence(to_logit(h["scores"]), full.labels[h["index"]], known_aspects(full.aspects[h["index"]]),
                              float(to_logit(report["threshold"])))
             for h, report in zip(check["held_out"], check["folds"])]
    return {"method": "Spearman correlation of the logit with the film's width/height within each class, and "
                      "specificity/sensitivity per width/height band, on each held-out fold at the fold's "
                      "threshold; films of unknown proportions (squashed copies) left out",
            "band_edges": list(BAND_EDGES), "folds": folds, "summary": summarize(folds)}


def first_folder_figures(check: dict, full: LabelledImages, first: Path, target_sensitivity: float) -> dict:
    """The check's clean figures on the held-out films of the first data folder only (each fold's
    threshold chosen on them): comparable with a check of a model trained on that folder alone."""
    first = first.resolve()
    from_first = np.array([first in Path(p).resolve().parents for p in full.paths])
    aucs, specs = [], []
    for h in check["held_out"]:
        mask = from_first[h["index"]]
        labels, scores = full.labels[h["index"]][mask], h["scores"][mask]
        report = binary_report(labels, scores, threshold_for_sensitivity(labels, scores, target_sensitivity))
        aucs.append(report["auc"])
        specs.append(report["specificity"])
    return {"folder": str(first), "held_out_images": int(sum(from_first[h["index"]].sum() for h in check["held_out"])),
            "auc": spread(aucs), "specificity": spread(specs)}


def load_training_folders(data_dirs: list[Path], *, size: int, cache_dir: Path,
                          version: str = PREPROCESSING_VERSION) -> LabelledImages:
    """The ``train/`` of every folder as one set (a film in several counts once, see ``combine``),
    prepared at preprocessing ``version``."""
    return combine([load_folder(d / "train", size=size, version=version,
                                cache=cache_dir / f"train{i + 1 if i else ''}_{size}{_cache_suffix(version)}.npz")
                    for i, d in enumerate(data_dirs)])


def _cache_suffix(version: str) -> str:
    """The training cache's file name part for ``version`` (none for the default, whose caches
    predate the others)."""
    return "" if version == PREPROCESSING_VERSION else f"_v{version}"


def train(data_dir: str | Path | list[str | Path], out_dir: str | Path, config: TrainingConfig = TrainingConfig(),
          *, cache_dir: str | Path | None = None) -> ModelCard:
    """``data_dir``: one Kaggle-layout folder or several (their ``train/`` together, split by patient
    across all of them; ``val/`` from the first that has one). The steps, in order: loading, the
    k-fold check, the patient split, the fit, the calibration, the threshold, the card."""
    data_dirs = [Path(d) for d in (data_dir if isinstance(data_dir, list) else [data_dir])]
    out_dir = Path(out_dir)
    full, official_val = _load(data_dirs, config, Path(cache_dir) if cache_dir else out_dir / "cache")
    validation, held_out_sets = _fold_check(full, config, data_dirs[0])
    tr, va = _split(full, config)
    serving, facts = fit_recipe(tr, va, config)
    calibration = _calibrate(serving, va, held_out_sets, config)
    val_scores = predict_prepared(serving, va.images)
    threshold = _threshold(calibration.operating_point, va, val_scores, config)
    validation = {"patient_split": {**binary_report(va.labels, val_scores, threshold),
                                    "curves": curves(va.labels, val_scores),
                                    "calibration": {"raw": calibration_figures(va.labels, calibration.raw_scores),
                                                    "calibrated": calibration_figures(va.labels, val_scores)}},
                  **validation, **calibration.card_sections()}
    if official_val is not None:
        validation["official_val"] = binary_report(official_val.labels, predict_prepared(serving, official_val.images),
                                                   threshold)
    card = _write_card(serving, out_dir, config, threshold=threshold, validation=validation, facts=facts,
                       data_dirs=data_dirs, full=full, tr=tr, va=va)
    save_held_out(out_dir / HELD_OUT_FILE, held_out_sets)
    write_training_reference(data_dirs, out_dir)  # the drift check's reference (model.drift)
    log.info("wrote %s (threshold %.4f, validation AUC %.4f)", out_dir, threshold,
             validation["patient_split"]["auc"])
    return card


def _load(data_dirs: list[Path], config: TrainingConfig,
          cache_dir: Path) -> tuple[LabelledImages, LabelledImages | None]:
    """Loading: every folder's ``train/`` as one set, and the official ``val/`` of the first folder
    that has one (None if none has)."""
    full = load_training_folders(data_dirs, size=config.input_size, cache_dir=cache_dir, version=config.preprocessing)
    val_dir = next((d / "val" for d in data_dirs if (d / "val").is_dir()), None)
    if val_dir is None:
        return full, None
    return full, load_folder(val_dir, size=config.input_size, version=config.preprocessing,
                             cache=cache_dir / f"val_{config.input_size}{_cache_suffix(config.preprocessing)}.npz")


def _fold_check(full: LabelledImages, config: TrainingConfig,
                first: Path) -> tuple[dict, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The folds (when ``config.folds``): the card's cross-validation sections and each fold's
    held-out score set."""
    if not config.folds:
        return {}, []
    check = kfold_check(full, config, k=config.folds)
    validation = card_sections(check)
    validation["cross_validation"]["first_folder"] = first_folder_figures(check, full, first,
                                                                          config.target_sensitivity)
    validation["frame_dependence"] = frame_card_section(check, full)
    return validation, [(f"fold {i + 1}", full.labels[h["index"]], h["scores"])
                        for i, h in enumerate(check["held_out"])]


def _split(full: LabelledImages, config: TrainingConfig) -> tuple[LabelledImages, LabelledImages]:
    """The patient split: training and validation films, no patient in both."""
    train_idx, val_idx = patient_split(full, val_fraction=config.val_fraction, seed=config.seed)
    tr, va = full.subset(train_idx), full.subset(val_idx)
    log.info("train %d images (%d patients), validation %d images (%d patients)",
             len(tr), len(set(tr.patients)), len(va), len(set(va.patients)))
    return tr, va


@dataclass(frozen=True)
class _Calibration:
    platt: Platt
    operating_point: dict | None
    note: str | None
    raw_scores: np.ndarray
    """The patient split's scores before calibration."""

    def card_sections(self) -> dict:
        sections = {"calibration": {
            "method": "Platt scaling (logistic regression on the logit) fitted on the patient split's held-out "
                      "scores, folded into the output layer: the served score is the calibrated probability",
            **self.platt.as_dict(), **({"not_calibrated": self.note} if self.note else {})}}
        if self.operating_point is not None:
            sections["operating_point"] = self.operating_point
        return sections


def _calibrate(serving, va: LabelledImages, held_out_sets: list[tuple[str, np.ndarray, np.ndarray]],
               config: TrainingConfig) -> _Calibration:
    """The calibration: a Platt map fitted on the patient split, folded into ``serving``'s output
    layer, and the operating point of every held-out set (the patient split's appended to
    ``held_out_sets``) when there are two or more."""
    raw_scores = predict_prepared(serving, va.images)
    held_out_sets.append(("patient split", va.labels, raw_scores))
    operating_point, note = None, None
    try:
        platt = fit_platt(va.labels, raw_scores)
        if len(held_out_sets) >= 2:
            operating_point = transferable_threshold(held_out_sets, target_sensitivity=config.target_sensitivity,
                                                     margin=config.operating_point == "margin",
                                                     seed=config.seed)
    except ValueError as exc:  # a network that has not learnt to rank its validation films
        log.warning("scores left uncalibrated, threshold from the patient split alone: %s", exc)
        platt, operating_point, note = Platt(), None, str(exc)
    fold_into_dense(serving, platt)
    return _Calibration(platt, operating_point, note, raw_scores)


def _threshold(operating_point: dict | None, va: LabelledImages, val_scores: np.ndarray,
               config: TrainingConfig) -> float:
    """The threshold: the operating point's, or else the patient split's for the target sensitivity."""
    if operating_point is not None:
        return operating_point["threshold"]
    return threshold_for_sensitivity(va.labels, val_scores, config.target_sensitivity)


def _write_card(serving, out_dir: Path, config: TrainingConfig, *, threshold: float, validation: dict,
                facts: dict, data_dirs: list[Path], full: LabelledImages, tr: LabelledImages,
                va: LabelledImages) -> ModelCard:
    """The card: the artifact written with what it was trained on, how, and what it scored."""
    return save_artifact(
        serving, out_dir,
        name=config.name, version=config.version, threshold=threshold, input_size=config.input_size,
        preprocessing_version=config.preprocessing,
        training_data={
            "source": "Kermany et al. 2018, Chest X-Ray Images (Pneumonia), doi:10.17632/rscbjbr9sj.2, CC BY 4.0",
            "folder": ", ".join(map(str, data_dirs)), "manifest_sha256": _manifest_hash(full),
            "train_images": len(tr), "validation_images": len(va),
            "validation_split": f"patient-level, stratified, {config.val_fraction:.0%} of train/, seed {config.seed}",
        },
        validation=validation,
        intended_population=KERMANY_POPULATION,
        training={**facts, "seed": config.seed, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                  "epochs": config.epochs, "augmentation": config.augmentation_name,
                  "label_smoothing": config.label_smoothing, "stretch": config.stretch,
                  "average": config.average, "balance_frame": config.balance_frame,
                  **({"average_epochs": config.average_epochs} if config.average == "swa" else {}),
                  **({"ema": config.ema} if config.average == "ema" else {}),
                  "target_sensitivity": config.target_sensitivity, "operating_point": config.operating_point},
    )
