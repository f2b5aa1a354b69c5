"""Inference speed of the shipped model on this machine's CPUs, per serving path.

The four fixture films under tests/fixtures/images are augmented (small
rotation, zoom, shift, gamma, mirror; seeded) into 64 distinct images, each
through model.preprocessing.prepare, so every variant sees the same real,
prepared ``uint8`` batch and does its own ``to_model_input``. For batch sizes
1, 8, 32 and 64, in the same run and interleaved repeat by repeat, it times:

- ``loaded-model``: ``LoadedModel.predict``, the production path (the
  model traced once into a graph that takes the ``uint8`` images and scales
  them itself, one call per batch);
- ``keras-eager``: ``keras_model(x, training=False)`` called eagerly, the
  production path before it was traced;
- ``keras-predict``: ``keras_model.predict(x, batch_size=...)``;
- ``batcher``: the production ``BatchPredictor`` (``max_batch`` = the batch size,
  ``max_wait_ms`` = 20), fed by 32 threads: one forward pass and one SQLite
  transaction per batch, as in an inference worker (a redelivered answer, after
  the first repeat, is written and kept once);
- ``tf-function`` and ``tf-function-xla``: the model traced once into a
  ``tf.function`` (shape ``[None, 224, 224, 3]``), without and with XLA;
- ``tflite``: the model converted with ``tf.lite.TFLiteConverter`` and run by
  ``tf.lite.Interpreter`` (when the installed TensorFlow still has it).

Prints median and p90 milliseconds per image, images/s, the ratio to the
15 ms-per-image target and each variant's largest absolute difference in
probability from ``keras_model.predict`` (batch 32) on the same images.
Writes JSON to bench/results/inference-<timestamp>.json.

    .venv/bin/python bench/inference.py [--repeats 5] [--tf-threads 0] [--json-out PATH] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from model.preprocessing import INPUT_SIZE, prepare, read_image_file, to_model_input  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "images"
BATCH_SIZES = (1, 8, 32, 64)
TARGET_MS = 15.0
BATCHER_THREADS = 32
BATCHER_WAIT_MS = 20.0

Predict = Callable[[np.ndarray], np.ndarray]


def fixture_images(count: int, seed: int = 0, size: int = INPUT_SIZE) -> np.ndarray:
    """``count`` images prepared at ``size``, made from the fixture films by seeded augmentation."""
    films = [read_image_file(p) for p in sorted(FIXTURES.glob("*/*.jpeg"))]
    if not films:
        raise FileNotFoundError(f"no fixture films under {FIXTURES}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        film = films[i % len(films)]
        if i < len(films):
            out.append(prepare(film, size))
            continue
        rows, cols = film.shape
        matrix = cv2.getRotationMatrix2D((cols / 2, rows / 2), rng.uniform(-7, 7), rng.uniform(0.92, 1.08))
        matrix[:, 2] += rng.uniform(-0.04, 0.04, size=2) * (cols, rows)
        image = cv2.warpAffine(film, matrix, (cols, rows), borderMode=cv2.BORDER_REFLECT)
        gamma = rng.uniform(0.8, 1.25)
        image = (255.0 * (image / 255.0) ** gamma).astype(np.uint8)
        if rng.random() < 0.5:
            image = image[:, ::-1]
        out.append(prepare(np.ascontiguousarray(image), size))
    return np.stack(out)


def tf_function_variant(keras_model, *, jit_compile: bool) -> Predict:
    import tensorflow as tf

    size = keras_model.input_shape[1]
    spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    forward = tf.function(lambda x: keras_model(x, training=False), input_signature=spec, jit_compile=jit_compile)
    return lambda batch: forward(to_model_input(batch)).numpy().reshape(-1)


def tflite_variant(keras_model) -> Predict:
    """A ``tf.lite`` conversion run with one interpreter per batch shape."""
    import tensorflow as tf

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()
    interpreters: dict[int, tf.lite.Interpreter] = {}

    def predict(batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n not in interpreters:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=os.cpu_count())
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, [n, *keras_model.input_shape[1:]])
            interpreter.allocate_tensors()
            interpreters[n] = interpreter
        interpreter = interpreters[n]
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], to_model_input(batch))
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1).copy()

    return predict


def batched_run(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(predict(images[i:i + batch_size]), dtype=np.float32).reshape(-1)
                           for i in range(0, len(images), batch_size)])


def scratch_instances(folder: Path, count: int):
    """A SQLite database in ``folder`` with ``count`` received instances: (session factory, their ids)."""
    from db.migrate import upgrade
    from db.queries import record_received
    from db.session import make_engine, make_sessionmaker

    url = f"sqlite:///{folder / 'bench.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions.begin() as session:
        ids = [record_received(session, StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.1",
                               SOPInstanceUID=f"1.2.3.1.{n}", SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
                               TransferSyntaxUID="1.2.840.10008.1.2.1", AccessionNumber=None, Modality="CR",
                               path=f"/spool/{n}.dcm", size_bytes=0, calling_ae="BENCH")[0] for n in range(count)]
    return sessions, ids


def batcher_run(predictor, images: np.ndarray, ids: list[int]) -> tuple[np.ndarray, float, float]:
    """All ``images`` through ``predictor`` from 32 threads; (scores, seconds, mean forward batch)."""
    scores = np.full(len(images), np.nan, dtype=np.float32)
    barrier = threading.Barrier(BATCHER_THREADS + 1)
    batches_before = predictor.batches

    def worker(start: int) -> None:
        barrier.wait()
        for i in range(start, len(images), BATCHER_THREADS):
            scores[i] = predictor.predict_one(ids[i], images[i])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(BATCHER_THREADS)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return scores, seconds, len(images) / max(predictor.batches - batches_before, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant and batch size")
    parser.add_argument("--tf-threads", type=int, default=0,
                        help="intra- and inter-op threads for configure_tensorflow (0 = TensorFlow's default)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (model.keras + model_card.json); default: the shipped model")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from rich.console import Console
    from rich.table import Table

    from model.artifact import configure_tensorflow, get_model
    from worker.batching import BatchPredictor

    console = Console(width=max(Console().width, 120))
    configure_tensorflow(intra_op_threads=args.tf_threads, inter_op_threads=args.tf_threads)
    import keras
    import tensorflow as tf

    loaded = get_model(args.model)
    keras_model = loaded.keras_model
    images = fixture_images(max(BATCH_SIZES), size=loaded.card.input_size)
    scratch = tempfile.TemporaryDirectory(prefix="pneumoscreen-inference-")
    sessions, ids = scratch_instances(Path(scratch.name), len(images))
    reference = keras_model.predict(to_model_input(images), batch_size=32, verbose=0).reshape(-1)

    variants: dict[str, Predict] = {
        "loaded-model": lambda batch: np.asarray(loaded.predict(batch), dtype=np.float32),
        "keras-eager": lambda batch: np.asarray(keras_model(to_model_input(batch), training=False)).reshape(-1),
        "keras-predict": lambda batch: keras_model.predict(to_model_input(batch), batch_size=len(batch),
                                                           verbose=0).reshape(-1),
        "tf-function": tf_function_variant(keras_model, jit_compile=False),
        "tf-function-xla": tf_function_variant(keras_model, jit_compile=True),
    }
    skipped: dict[str, str] = {}
    if hasattr(tf, "lite"):
        try:
            variants["tflite"] = tflite_variant(keras_model)
        except (RuntimeError, ValueError, ImportError) as exc:
            skipped["tflite"] = f"conversion failed: {exc}"
    else:
        skipped["tflite"] = "tf.lite is not in this TensorFlow"

    threads = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
               "configure_tensorflow_arg": args.tf_threads, "cpus": len(os.sched_getaffinity(0)),
               "tflite_num_threads": os.cpu_count(),
               "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (on)")}
    console.print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {threads['cpus']} CPUs; "
                  f"threads intra_op={threads['intra_op']} inter_op={threads['inter_op']} (0 = TensorFlow's "
                  f"default: one per core); configure_tensorflow({args.tf_threads}, {args.tf_threads})")
    console.print(f"model {loaded.card.name} {loaded.card.version}: {loaded.card.input_size} pixels in, "
                  f"{len(loaded.card.training.get('members') or [None])} network(s)")
    if skipped:
        console.print(f"skipped: {skipped}")

    results = []
    for batch_size in BATCH_SIZES:
        n = max(batch_size, 32)  # images timed per repeat
        batch_images = images[:n]
        timings: dict[str, list[float]] = {name: [] for name in [*variants, "batcher"]}
        diffs: dict[str, float] = {}
        mean_batches: list[float] = []
        for name, predict in variants.items():  # warm-up (and XLA compilation for this shape)
            batched_run(predict, batch_images, batch_size)
        # one long-lived batcher per batch size, as in a worker process
        predictor = BatchPredictor(sessions, loaded, max_batch=batch_size, max_wait_ms=BATCHER_WAIT_MS)
        batcher_run(predictor, batch_images, ids)
        for _ in range(args.repeats):  # interleaved so drift in machine load hits every variant alike
            for name, predict in variants.items():
                started = time.perf_counter()
                scores = batched_run(predict, batch_images, batch_size)
                timings[name].append((time.perf_counter() - started) * 1000 / n)
                diffs[name] = max(diffs.get(name, 0.0), float(np.abs(scores - reference[:n]).max()))
            scores, seconds, mean_batch = batcher_run(predictor, batch_images, ids)
            timings["batcher"].append(seconds * 1000 / n)
            diffs["batcher"] = max(diffs.get("batcher", 0.0), float(np.abs(scores - reference[:n]).max()))
            mean_batches.append(mean_batch)
        for name, ms in timings.items():
            median, p90 = float(np.median(ms)), float(np.percentile(ms, 90))
            row = {"variant": name, "batch_size": batch_size, "images_per_repeat": n,
                   "ms_per_image_median": round(median, 3), "ms_per_image_p90": round(p90, 3),
                   "images_per_second": round(1000 / median, 1), "ratio_to_target": round(median / TARGET_MS, 3),
                   "max_abs_diff_vs_keras_predict": diffs[name], "ms_per_image_all": [round(m, 3) for m in ms]}
            if name == "batcher":
                row["mean_forward_batch"] = round(float(np.mean(mean_batches)), 1)
            results.append(row)

    table = Table(title=f"ms per image, {args.repeats} repeats, target {TARGET_MS:g} ms")
    for column in ("variant", "batch", "fwd batch", "median ms", "p90 ms", "images/s", "/ target",
                   "max |dp| vs keras", "x loaded-model"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    production = {r["batch_size"]: r["ms_per_image_median"] for r in results if r["variant"] == "loaded-model"}
    for r in sorted(results, key=lambda r: (r["batch_size"], r["ms_per_image_median"])):
        table.add_row(r["variant"], str(r["batch_size"]), str(r.get("mean_forward_batch", r["batch_size"])),
                      f"{r['ms_per_image_median']:.2f}", f"{r['ms_per_image_p90']:.2f}",
                      f"{r['images_per_second']:.1f}", f"{r['ratio_to_target']:.2f}",
                      f"{r['max_abs_diff_vs_keras_predict']:.1e}",
                      f"{production[r['batch_size']] / r['ms_per_image_median']:.2f}")
    console.print(table)

    at_32 = next(r for r in results if r["variant"] == "loaded-model" and r["batch_size"] == 32)
    verdict = "meets" if at_32["ms_per_image_median"] <= TARGET_MS else "misses"
    console.print(f"production path at batch 32: {at_32['ms_per_image_median']:.2f} ms/image median "
                  f"(p90 {at_32['ms_per_image_p90']:.2f}), {verdict} the {TARGET_MS:g} ms target")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.json_out or ROOT / "bench" / "results" / f"inference-{stamp}.json"
    report = {"created_at": stamp, "host": platform.node(), "python": platform.python_version(),
              "tensorflow": tf.__version__, "keras": keras.__version__, "threads": threads,
              "model": {"name": loaded.card.name, "version": loaded.card.version, "sha256": loaded.card.sha256},
              "images": {"source": "tests/fixtures/images, augmented", "count": len(images)},
              "repeats": args.repeats, "target_ms_per_image": TARGET_MS, "skipped": skipped, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
