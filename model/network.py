"""The screening CNN: a compact network that trains from scratch on two CPU cores.

Design choices (see the model card for measured figures):
- a stride-2 stem and an early pooling: the costly full-resolution layers are
  cheap, which roughly doubles training throughput at the same accuracy;
- BatchNorm momentum 0.9 instead of Keras' 0.99: with a couple of thousand
  images the moving statistics otherwise lag for epochs and validation
  AUC stays near chance;
- augmentation layers that suit chest films (small rotations, shifts and
  zooms, brightness and contrast), no horizontal flip: a chest film has a
  fixed left-right layout. They are part of the model and only act while
  training;
- optionally (``stretch``), the zoom acts on each axis on its own: ``prepare``
  squeezes every film to a square, and in the Kermany training set the
  frame's proportions alone tell the classes apart (width/height AUC 0.86:
  normal films are narrower). Stretching each axis by up to 25 % was measured
  and not kept: it cost clean specificity, and a film cut to other proportions
  still cost it about half its specificity (see the README's model section);
- several trained networks of one input size serve as one model
  (:func:`build_ensemble`): one input, each member's trunk, the mean of their
  logits through one sigmoid output, so calibration, the threshold, Grad-CAM
  and every serving path treat an ensemble as they treat one network.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from model.preprocessing import INPUT_SIZE

BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters: int, *, strides: int = 1, name: str):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _features(x, *, dropout: float, prefix: str = ""):
    """The convolutional trunk up to the pooled, dropped-out features; every layer named ``prefix + name``."""
    x = _conv_bn_relu(x, 32, strides=2, name=f"{prefix}stem")
    x = layers.MaxPooling2D(name=f"{prefix}stem_pool")(x)
    for i, filters in enumerate((64, 128, 192)):
        x = _conv_bn_relu(x, filters, name=f"{prefix}block{i + 1}a")
        x = _conv_bn_relu(x, filters, name=f"{prefix}block{i + 1}b")
        x = layers.MaxPooling2D(name=f"{prefix}block{i + 1}_pool")(x)
    x = _conv_bn_relu(x, 256, name=f"{prefix}head")
    x = layers.GlobalAveragePooling2D(name=f"{prefix}gap")(x)
    return layers.Dropout(dropout, name=f"{prefix}dropout")(x)


def build_network(input_size: int = INPUT_SIZE, *, dropout: float = 0.3, augment: bool = True,
                  stretch: float = 0.0) -> keras.Model:
    """Build (uncompiled) the screening CNN: ``(size, size, 3)`` in [0, 1] -> P(pneumonia).

    ``stretch``: when above 0, the training zoom's largest zoom-in, drawn for each
    axis on its own; 0 (the default) zooms both axes by one factor, +-10 %.
    """
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    x = inputs
    if augment:
        x = layers.RandomRotation(0.03, fill_mode="constant", name="aug_rotate")(x)
        x = layers.RandomTranslation(0.05, 0.05, fill_mode="constant", name="aug_shift")(x)
        if stretch:
            x = layers.RandomZoom((-stretch, 0.1), (-stretch, 0.1), fill_mode="constant", name="aug_zoom")(x)
        else:
            x = layers.RandomZoom((-0.1, 0.1), fill_mode="constant", name="aug_zoom")(x)
        x = layers.RandomBrightness(0.1, value_range=(0.0, 1.0), name="aug_brightness")(x)
        x = layers.RandomContrast(0.2, name="aug_contrast")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(_features(x, dropout=dropout))
    return keras.Model(inputs, outputs, name="pneumoscreen_cnn")


def member_prefix(index: int) -> str:
    """The prefix of the ``index``-th member's layers in :func:`build_ensemble`."""
    return f"m{index + 1}_"


def build_ensemble(members: Sequence[keras.Model], *, dropout: float = 0.3) -> keras.Model:
    """One servable model from trained screening CNNs of one input size: each member's trunk
    (its layers renamed ``m1_...``, ``m2_...``, weights copied, augmentation layers left out),
    its output layer without the sigmoid (``m1_logit``...), and the mean of those logits through
    one sigmoid output layer, ``pneumonia`` (kernel ``1/n``, bias 0, so that
    :func:`model.operating_point.fold_into_dense` calibrates the ensemble as it does one network).
    Grad-CAM reads every member's ``..._head_relu``."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    size = members[0].inputs[0].shape[1]
    inputs = keras.Input(shape=(size, size, 3), name="image")
    logits = []
    for i in range(len(members)):
        prefix = member_prefix(i)
        logits.append(layers.Dense(1, name=f"{prefix}logit")(_features(inputs, dropout=dropout, prefix=prefix)))
    mean = layers.Dense(1, activation="sigmoid", name="pneumonia",
                        kernel_initializer=keras.initializers.Constant(1.0 / len(members)),
                        bias_initializer="zeros")(layers.Concatenate(name="logits")(logits))
    ensemble = keras.Model(inputs, mean, name="pneumoscreen_ensemble")
    for i, member in enumerate(members):
        if member.inputs[0].shape[1] != size:
            raise ValueError(f"member {i + 1} takes {member.inputs[0].shape[1]} pixels, member 1 {size}")
        prefix = member_prefix(i)
        for layer in member.layers:
            if not layer.weights or layer.name.startswith("aug_"):
                continue
            name = f"{prefix}logit" if layer.name == "pneumonia" else f"{prefix}{layer.name}"
            ensemble.get_layer(name).set_weights(layer.get_weights())
    return ensemble
