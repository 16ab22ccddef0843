"""MobileNet backbones, ImageNet initialisation from a local weights file, preprocessing."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.records import FloatImage

BACKBONES = ("mobilenet_v2", "mobilenet_v1", "mobilenet_v3_small")
# Input scaling each family was trained with (the V2 file is torchvision's training).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


def resize(image: FloatImage, size: int) -> FloatImage:
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, (size, size), interpolation=interpolation), np.float32)


class BackboneError(ValueError):
    """A backbone cannot be built or initialised as asked; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """How an enhanced image becomes the network's input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_backbone(cls, backbone: str, size: int) -> Preprocessing:
        if backbone == "mobilenet_v2":
            return cls(size, TORCHVISION_MEAN, TORCHVISION_STD)
        # Keras' MobileNet V1 / V3 conventions: [-1, 1].
        return cls(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def apply(self, image: FloatImage) -> npt.NDArray[np.float32]:
        """A CLAHE image in [0, 1] (grey or RGB) to a (size, size, 3) network input."""
        pixels = resize(image, self.size)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.asarray((pixels - mean) / std, dtype=np.float32)

    def batch(self, images: list[FloatImage]) -> npt.NDArray[np.float32]:
        return np.stack([self.apply(image) for image in images]).astype(np.float32)


_PREDICTORS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def predictor(model: Any) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
    """The model's inference as one traced graph, built once per model.

    A Keras model called eagerly spends most of its time in Python, layer by layer: the
    traced graph runs the same weights about three times faster on CPU. The batch dimension
    is left open, so batches of any size share one trace."""
    traced = _PREDICTORS.get(model)
    if traced is None:
        import tensorflow as tf

        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        traced = tf.function(lambda batch: model(batch, training=False), input_signature=[spec])
        _PREDICTORS[model] = traced
    call = traced
    return lambda batch: np.asarray(call(batch))


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _constructor(backbone: str) -> Any:
    quiet_tensorflow()
    import keras

    return {
        "mobilenet_v2": keras.applications.MobileNetV2,
        "mobilenet_v1": keras.applications.MobileNet,
        "mobilenet_v3_small": keras.applications.MobileNetV3Small,
    }[backbone]


def _extra(backbone: str) -> dict[str, Any]:
    # V3 in Keras rescales its input itself unless told not to; we do it in Preprocessing.
    return {"include_preprocessing": False} if backbone == "mobilenet_v3_small" else {}


def _torchvision_batchnorm(model: Any) -> None:
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.epsilon = 1e-5


def build_backbone(backbone: str, alpha: float, size: int, weights: str) -> Any:
    """A feature extractor (global average pooled) at ``size`` px.

    ``weights``: a path to an ImageNet ``.weights.h5`` of the full 224 px classifier (loaded,
    then copied layer by layer), ``imagenet`` (Keras downloads it, where a network exists),
    or ``none``.
    """
    if backbone not in BACKBONES:
        raise BackboneError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    build = _constructor(backbone)
    extra = _extra(backbone)
    if weights == "imagenet":
        try:
            return build(
                input_shape=(size, size, 3),
                alpha=alpha,
                include_top=False,
                weights="imagenet",
                pooling="avg",
                **extra,
            )
        except Exception as exc:
            raise BackboneError(
                "--backbone-weights imagenet needs a network to download the weights; "
                f"give the path of a local .weights.h5 instead ({type(exc).__name__})"
            ) from None
    model = build(
        input_shape=(size, size, 3),
        alpha=alpha,
        include_top=False,
        weights=None,
        pooling="avg",
        **extra,
    )
    if backbone == "mobilenet_v2":
        _torchvision_batchnorm(model)
    if weights == "none":
        return model
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"backbone weights {path} do not exist")
    full_kwargs: dict[str, Any] = {
        "input_shape": (224, 224, 3),
        "alpha": alpha,
        "include_top": True,
        "weights": None,
        **extra,
    }
    if backbone == "mobilenet_v2":
        full_kwargs["classifier_activation"] = None
    full = build(**full_kwargs)
    if backbone == "mobilenet_v2":
        _torchvision_batchnorm(full)
    try:
        full.load_weights(str(path))
    except Exception as exc:
        raise BackboneError(
            f"{path.name} does not fit {backbone} alpha {alpha}: {type(exc).__name__}: {exc}"
        ) from None
    copied = 0
    for layer in model.layers:
        try:
            source = full.get_layer(layer.name)
        except ValueError:
            continue
        values = source.get_weights()
        if values and [v.shape for v in values] == [w.shape for w in layer.get_weights()]:
            layer.set_weights(values)
            copied += 1
    if copied == 0:
        raise BackboneError(f"no layer of {path.name} matches {backbone} alpha {alpha}")
    return model
