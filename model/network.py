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
  still cost it about half its specificity (see the README's model section).
"""

from __future__ import annotations

import keras
from keras import layers

from model.preprocessing import INPUT_SIZE

BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters: int, *, strides: int = 1, name: str):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


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
    x = _conv_bn_relu(x, 32, strides=2, name="stem")
    x = layers.MaxPooling2D(name="stem_pool")(x)
    for i, filters in enumerate((64, 128, 192)):
        x = _conv_bn_relu(x, filters, name=f"block{i + 1}a")
        x = _conv_bn_relu(x, filters, name=f"block{i + 1}b")
        x = layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    x = _conv_bn_relu(x, 256, name="head")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="pneumoscreen_cnn")
