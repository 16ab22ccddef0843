"""Serving a re-identification model: the embedding network rebuilt from its artifact.

The network is a MobileNet backbone, a linear projection and L2 normalisation, optionally
followed by a within-class whitening and L2 normalisation again; images of one patient land
close together, compared by cosine. How it is trained is ``training.reid``.

The backbone's features are its global average pool, or, where ``feature_layers`` names
inner layers, those layers' maps average-pooled on a ``grid`` x ``grid`` layout, each
square-rooted and L2-normalised, side by side. Mid-level maps pooled by region keep where in
the image a shape lies (the outline of a child's ribs, a lesion's border), which the global
pool of the last layer, made to name ImageNet's objects, averages away.

Where ``flips`` names flips, the features are the mean of the image's and its flipped
copies': a lesion has no up, down, left or right, and the backbone's features of a flipped
picture are not those of the picture, so the mean is steadier across photographs of one
lesion. Each flip costs one more pass of the backbone.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.models import artifacts
from pipeline.models.backbone import Preprocessing, build_backbone, predictor, quiet_tensorflow
from pipeline.records import FloatImage
from pipeline.vectors import l2_normalise
from pipeline.verdicts import ByGallerySize


class Flip(enum.StrEnum):
    HORIZONTAL = "horizontal"  # left to right
    VERTICAL = "vertical"  # top to bottom


# the image axis each flip reverses, in a batch of height x width x channels images
FLIP_AXIS = {Flip.HORIZONTAL: 2, Flip.VERTICAL: 1}


def flipped(image: FloatImage, flip: Flip) -> FloatImage:
    """One image (height x width, with or without channels) flipped."""
    return np.ascontiguousarray(np.flip(image, axis=FLIP_AXIS[flip] - 1))


@dataclass(frozen=True)
class EmbedderShape:
    """What it takes to rebuild the network; the rest of a model's config is its training."""

    modality: str
    backbone: str = "mobilenet_v2"
    alpha: float = 1.0
    size: int = 128
    embedding_dim: int = 128
    # The frozen recipe's projection centres its features first: that is the bias.
    recipe: str = "finetune"
    # > 0: a within-class whitening of the unit embeddings follows the projection.
    whitening_dim: int = 0
    # Inner layers whose maps are pooled on a grid; empty: the backbone's global pool.
    feature_layers: tuple[str, ...] = ()
    grid: int = 1
    # Features averaged over the image and these flips of it; empty: the image alone.
    flips: tuple[Flip, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "flips", tuple(Flip(f) for f in self.flips))

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> EmbedderShape:
        """The shape named by a model description's ``config`` (unknown keys left out)."""
        known = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        for name in ("feature_layers", "flips"):
            if name in known:
                known[name] = tuple(known[name] or ())
        return cls(**known)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing.for_backbone(self.backbone, self.size)


def build_features(shape: EmbedderShape, weights: str, backbone: Any = None) -> Any:
    """Image -> the features the projection reads (see the module's note), on ``backbone``
    if one is given."""
    quiet_tensorflow()
    import keras

    if backbone is None:
        backbone = build_backbone(shape.backbone, shape.alpha, shape.size, weights)
    one = _view_features(shape, backbone, "features" if not shape.flips else "view_features")
    if not shape.flips:
        return one
    inputs = keras.Input((shape.size, shape.size, 3), name="image")
    views = [one(inputs)]
    for flip in shape.flips:
        flipped = keras.layers.Lambda(
            lambda x, axis=FLIP_AXIS[flip]: keras.ops.flip(x, axis=axis), name=f"flip_{flip}"
        )(inputs)
        views.append(one(flipped))
    return keras.Model(inputs, keras.layers.Average()(views), name="features")


def _view_features(shape: EmbedderShape, backbone: Any, name: str) -> Any:
    """The features of one view of the image."""
    import keras

    inputs = keras.Input((shape.size, shape.size, 3), name="image")
    if not shape.feature_layers:
        return keras.Model(inputs, backbone(inputs), name=name)
    try:
        maps = [backbone.get_layer(name).output for name in shape.feature_layers]
    except ValueError as exc:
        raise ValueError(f"{shape.backbone} has no layer {exc}") from None
    taps = keras.Model(backbone.input, maps, name="taps")(inputs)
    pooled = []
    for name, fmap in zip(
        shape.feature_layers, taps if isinstance(taps, list) else [taps], strict=True
    ):
        height, width = int(fmap.shape[1]), int(fmap.shape[2])
        if height % shape.grid or width % shape.grid:
            raise ValueError(
                f"layer {name} is {height}x{width} at {shape.size} px: not divisible into a "
                f"{shape.grid}x{shape.grid} grid"
            )
        cells = keras.layers.AveragePooling2D((height // shape.grid, width // shape.grid))(fmap)
        flat = keras.layers.Flatten()(cells)
        # The square root tempers the few channels that fire strongly everywhere.
        rooted = keras.layers.Lambda(lambda x: keras.ops.sqrt(keras.ops.relu(x)))(flat)
        pooled.append(keras.layers.UnitNormalization()(rooted))
    joined = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate()(pooled)
    return keras.Model(inputs, joined, name=name)


def build_embedder(shape: EmbedderShape, weights: str, backbone: Any = None) -> Any:
    """Image -> L2-normalised embedding, on ``backbone`` if one is given."""
    quiet_tensorflow()
    import keras

    inputs = keras.Input((shape.size, shape.size, 3), name="image")
    features = build_features(shape, weights, backbone)(inputs)
    projected = keras.layers.Dense(
        shape.embedding_dim, use_bias=shape.recipe == "frozen", name="projection"
    )(features)
    if not shape.whitening_dim:
        embedding = keras.layers.UnitNormalization(name="embedding")(projected)
        return keras.Model(inputs, embedding, name=f"reid_{shape.modality}")
    unit = keras.layers.UnitNormalization(name="unit")(projected)
    whitened = keras.layers.Dense(shape.whitening_dim, name="whitening")(unit)
    embedding = keras.layers.UnitNormalization(name="embedding")(whitened)
    return keras.Model(inputs, embedding, name=f"reid_{shape.modality}")


def embed_images(
    model: Any,
    images: list[FloatImage],
    prep: Preprocessing,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    out = []
    run = predictor(model)
    for start in range(0, len(images), batch_size):
        out.append(run(prep.batch(images[start : start + batch_size])))
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out).astype(np.float32)


class ReidModel:
    """A loaded re-identification artifact."""

    def __init__(self, folder: Path) -> None:
        quiet_tensorflow()
        self.folder = folder
        self.description = artifacts.read_model(folder)
        if self.description["kind"] != "reid":
            raise artifacts.ArtifactError(f"{folder} is a {self.description['kind']} model")
        self.config = EmbedderShape.of(self.description["config"])
        self.preprocessing = self.config.preprocessing()
        self.model = build_embedder(self.config, "none")
        self.model.set_weights(artifacts.load_weights(folder))
        self.threshold = float(self.description["threshold"])
        # recorded by training since real-image models; older artifacts have none
        margin = self.description.get("margin")
        self.margin: float | None = None if margin is None else float(margin)
        self.margins = ByGallerySize.of(self.description.get("margins"), "margins")
        self.stranger_thresholds = ByGallerySize.of(self.description.get("stranger_thresholds"))

    @property
    def version(self) -> str:
        return artifacts.model_name(self.description)

    def embed(
        self, images: list[FloatImage], progress: Callable[[int, int], None] | None = None
    ) -> npt.NDArray[np.float32]:
        """Embeddings of enhanced images (any size; they are resized here)."""
        return l2_normalise(embed_images(self.model, images, self.preprocessing, progress=progress))
