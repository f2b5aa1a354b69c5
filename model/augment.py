"""Training-time augmentation that imitates acquisition differences.

Films from another hospital or scanner differ less in anatomy than in how
they were exposed, windowed and resampled. :func:`acquisition_augment`
draws, per image: a crop-zoom (the field of view), a display gamma, a
contrast window (narrower or wider), a variable blur and Gaussian noise. It
is a ``tf.data`` map on grey batches in [0, 1], applied before the network's
own geometric and brightness/contrast layers, and never at serving time.

Down/up-scaling is deliberately left out, so that the ``down_up_0.5`` shift of
:mod:`model.validation` stays a perturbation the training never saw.

The ``framing`` recipe adds one thing: the crop also takes each film to
frame proportions (width / height) drawn from the whole training set,
whatever its class. In the Kermany/Kaggle films the proportions alone tell
the classes apart (AUC 0.86 on train/: normals are narrower, median 1.22
against 1.50), so a network can learn the frame instead of the lungs and
then call a normal film cut to other proportions pneumonia. With the
proportions drawn independently of the label, they carry no class.
Measured on the 3-fold check it made a film cut shorter much less of a
false alarm (specificity 0.79 against 0.54) but cost clean specificity (0.91
against 0.98) and the official ``val/`` normals, so it is an option, not the
default.
"""

from __future__ import annotations

import math

#: Recipes accepted by :class:`model.train.TrainingConfig.augmentation`.
AUGMENTATIONS = ("standard", "acquisition", "framing")

GAMMA_RANGE = (0.55, 1.8)
WINDOW_LOW = (-0.1, 0.2)
WINDOW_HIGH = (0.8, 1.1)
BLUR_SIGMA = 1.5
NOISE_SD_MAX = 0.05
CROP_FRACTION = (0.8, 1.0)
#: The ``framing`` crop keeps at least this fraction of the rows or columns.
FRAMING_MIN_FRACTION = 0.6


def _gaussian_kernel(sigma: float):
    import tensorflow as tf

    radius = int(math.ceil(3 * sigma))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (x / sigma) ** 2)
    k = k / tf.reduce_sum(k)
    return tf.reshape(k, (-1, 1, 1, 1)), tf.reshape(k, (1, -1, 1, 1))


def framing_fractions(aspects, targets):
    """The fractions of rows and of columns to keep so that films of frame
    proportions ``aspects`` (width / height, before the square resize) get
    proportions ``targets``: one axis is cut, never both, and by no more
    than down to :data:`FRAMING_MIN_FRACTION`. Tensors ``(n, 1)`` in, two out."""
    import tensorflow as tf

    rows = tf.clip_by_value(aspects / targets, FRAMING_MIN_FRACTION, 1.0)
    columns = tf.clip_by_value(targets / aspects, FRAMING_MIN_FRACTION, 1.0)
    return rows, columns


def acquisition_augment(x, aspects=None, target_aspects=None):
    """``x``: float32 ``(batch, h, w, 1)`` in [0, 1] -> the same shape, randomly re-acquired.

    With ``aspects`` (each film's width / height before the square resize,
    ``(batch,)``) and ``target_aspects`` (a pool of proportions, 1-D), the
    crop also reframes each film to proportions drawn from the pool
    (the ``framing`` recipe).
    """
    import tensorflow as tf

    shape = tf.shape(x)
    n, h, w = shape[0], shape[1], shape[2]

    def uniform(low: float, high: float):
        return tf.random.uniform((n, 1, 1, 1), low, high)

    # field of view: a random box of 80-100 % of each side, resized back
    frac = tf.random.uniform((n, 1), *CROP_FRACTION)
    rows = columns = frac
    if aspects is not None:
        pool = tf.convert_to_tensor(target_aspects, tf.float32)
        drawn = tf.gather(pool, tf.random.uniform((n,), 0, tf.shape(pool)[0], dtype=tf.int32))
        keep_rows, keep_columns = framing_fractions(tf.reshape(tf.cast(aspects, tf.float32), (-1, 1)),
                                                    tf.reshape(drawn, (-1, 1)))
        rows, columns = frac * keep_rows, frac * keep_columns
    top = tf.random.uniform((n, 1)) * (1.0 - rows)
    left = tf.random.uniform((n, 1)) * (1.0 - columns)
    boxes = tf.concat([top, left, top + rows, left + columns], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(n), tf.stack([h, w]))

    # display gamma, log-uniform
    g = tf.exp(uniform(math.log(GAMMA_RANGE[0]), math.log(GAMMA_RANGE[1])))
    x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), g)

    # contrast window, on half of the images
    low, high = uniform(*WINDOW_LOW), uniform(*WINDOW_HIGH)
    windowed = tf.clip_by_value((x - low) / (high - low), 0.0, 1.0)
    x = tf.where(uniform(0.0, 1.0) < 0.5, windowed, x)

    # variable blur: a per-image mix of the image and its Gaussian blur, on half of the images
    ky, kx = _gaussian_kernel(BLUR_SIGMA)
    padded = tf.pad(x, [[0, 0], [ky.shape[0] // 2] * 2, [kx.shape[1] // 2] * 2, [0, 0]], mode="REFLECT")
    blurred = tf.nn.conv2d(tf.nn.conv2d(padded, ky, 1, "VALID"), kx, 1, "VALID")
    amount = uniform(0.0, 1.0) * tf.cast(uniform(0.0, 1.0) < 0.5, tf.float32)
    x = x + amount * (blurred - x)

    # sensor noise
    x = x + tf.random.normal(tf.shape(x)) * uniform(0.0, NOISE_SD_MAX)
    return tf.clip_by_value(x, 0.0, 1.0)
