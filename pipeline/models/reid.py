"""Per-modality re-identification: a MobileNet that embeds an image so that images of one
patient lie close together and those of different patients far apart.

Metric learning with a CosFace head (large-margin cosine loss, Wang et al. 2018): each training
patient is a class whose weight vector is a prototype on the unit sphere, and the loss asks
every embedding to be closer to its own prototype than to any other by a margin. It needs no
pair or triplet mining, stays stable with the few images per patient a hospital has, and the
embedding it leaves is compared by cosine, as the gallery does. The classification head is
thrown away after training; the threshold is calibrated on validation patients never seen in
training.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.datasets.augment import AugmentParams, augment
from pipeline.datasets.reader import DatasetItem, iter_images, resize, scan_modality
from pipeline.metrics import (
    cosine_similarity,
    l2_normalise,
    pair_scores,
    retrieval_scores,
    threshold_for_false_match_rate,
    verification_scores,
)
from pipeline.models import artifacts
from pipeline.models.backbone import Preprocessing, build_backbone, predictor, quiet_tensorflow
from pipeline.records import FloatImage
from pipeline.runner import PipelineConfig

# Horizontal flips change anatomy (the heart's side, the liver's); only dermoscopy is
# free of a left and right.
DEFAULT_FLIP = {"xray": False, "ct": False, "mri": False, "dermoscopy": True}
Progress = Callable[[str, int, int, dict[str, float]], None]


@dataclass(frozen=True)
class ReidConfig:
    modality: str
    backbone: str = "mobilenet_v2"
    alpha: float = 1.0
    size: int = 128
    backbone_weights: str = "none"
    epochs: int = 12
    batch_size: int = 32
    embedding_dim: int = 128
    learning_rate: float = 5e-4
    cosface_scale: float = 30.0
    cosface_margin: float = 0.35
    validation_fraction: float = 0.2
    false_match_rate: float = 0.01
    rotation_deg: float = 15.0
    zoom: float = 0.1
    horizontal_flip: bool | None = None  # None: the modality's default
    brightness: tuple[float, float] | None = (0.8, 1.2)
    seed: int = 0

    def augmentation(self) -> AugmentParams:
        flip = DEFAULT_FLIP.get(self.modality, False)
        if self.horizontal_flip is not None:
            flip = self.horizontal_flip
        return AugmentParams(self.rotation_deg, self.zoom, flip, self.brightness)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing.for_backbone(self.backbone, self.size)


@dataclass
class LoadedSet:
    items: list[DatasetItem]
    images: list[FloatImage]  # enhanced, resized to the model's size
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [i.patient_id for i in self.items]

    def subset(self, keep: list[int]) -> LoadedSet:
        return LoadedSet([self.items[i] for i in keep], [self.images[i] for i in keep])


def load_set(
    items: list[DatasetItem], size: int, pipeline: PipelineConfig | None = None
) -> LoadedSet:
    """Images through the service's decode and CLAHE stages, resized once."""
    loaded = LoadedSet([], [])
    for item, image, reason in iter_images(items, pipeline or PipelineConfig()):
        if image is None:
            loaded.skipped.append((item.path, reason or "unreadable"))
            continue
        loaded.items.append(item)
        loaded.images.append(resize(image, size))
    return loaded


def patient_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation images; no patient is on both sides."""
    patients = sorted(set(labels))
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_val = max(2, round(len(patients) * fraction)) if len(patients) >= 6 else 0
    held_out = set(patients[:n_val])
    train = [i for i, p in enumerate(labels) if p not in held_out]
    val = [i for i, p in enumerate(labels) if p in held_out]
    return train, val


# --------------------------------------------------------------------------- the network


def build_embedder(config: ReidConfig, weights: str) -> Any:
    """Image -> L2-normalised embedding."""
    quiet_tensorflow()
    import keras

    backbone = build_backbone(config.backbone, config.alpha, config.size, weights)
    inputs = keras.Input((config.size, config.size, 3), name="image")
    features = backbone(inputs)
    projected = keras.layers.Dense(config.embedding_dim, use_bias=False, name="projection")(
        features
    )
    embedding = keras.layers.UnitNormalization(name="embedding")(projected)
    return keras.Model(inputs, embedding, name=f"reid_{config.modality}")


def _cosface_model(embedder: Any, classes: int, scale: float, margin: float) -> Any:
    import keras
    from keras import ops

    class CosFaceLogits(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__(name="cosface")

        def build(self, input_shape: Any) -> None:
            self.prototypes = self.add_weight(
                shape=(int(input_shape[0][-1]), classes),
                initializer="glorot_uniform",
                name="prototypes",
            )

        def call(self, inputs: Any) -> Any:
            embedding, onehot = inputs
            cosine = ops.matmul(embedding, ops.normalize(self.prototypes, axis=0))
            return scale * (cosine - margin * onehot)

    image = keras.Input(embedder.input_shape[1:], name="image")
    onehot = keras.Input((classes,), name="onehot")
    logits = CosFaceLogits()([embedder(image), onehot])
    return keras.Model([image, onehot], logits)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainedReid:
    folder: Path
    description: dict[str, Any]


def embed_images(
    model: Any, images: list[FloatImage], prep: Preprocessing, batch_size: int = 32
) -> npt.NDArray[np.float32]:
    out = []
    run = predictor(model)
    for start in range(0, len(images), batch_size):
        out.append(run(prep.batch(images[start : start + batch_size])))
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out).astype(np.float32)


def _scores(embeddings: npt.NDArray[np.float32], labels: list[str]) -> dict[str, float]:
    similarity = cosine_similarity(embeddings)
    retrieval = retrieval_scores(similarity, labels)
    verification = verification_scores(similarity, labels)
    return {
        "p_at_1": retrieval.p_at_1,
        "map_at_r": retrieval.map_at_r,
        "roc_auc": verification.roc_auc,
        "eer": verification.eer,
    }


def train_reid(
    config: ReidConfig,
    dataset: Path,
    out: Path,
    *,
    version: str | None = None,
    pipeline: PipelineConfig | None = None,
    progress: Progress | None = None,
) -> TrainedReid:
    """Train, calibrate and save a re-identification model for ``config.modality``."""
    quiet_tensorflow()
    import keras

    started = time.monotonic()
    keras.utils.set_random_seed(config.seed)
    pipeline = pipeline or PipelineConfig()
    prep = config.preprocessing()
    items = scan_modality(dataset, config.modality)
    data = load_set(items, config.size, pipeline)
    if len(set(data.labels)) < 2:
        raise ValueError(f"{dataset} needs images of at least two patients")
    train_idx, val_idx = patient_split(data.labels, config.validation_fraction, config.seed)
    train = data.subset(train_idx)
    val = data.subset(val_idx)
    classes = sorted(set(train.labels))
    class_of = {p: i for i, p in enumerate(classes)}
    y = np.array([class_of[p] for p in train.labels])

    embedder = build_embedder(config, config.backbone_weights)
    trainer = _cosface_model(embedder, len(classes), config.cosface_scale, config.cosface_margin)
    steps_per_epoch = max(1, math.ceil(len(train.images) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=steps_per_epoch * config.epochs, alpha=0.05
    )
    trainer.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    params = config.augmentation()
    rng = np.random.default_rng(config.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, list[Any]] | None = None
    for epoch in range(config.epochs):
        order = rng.permutation(len(train.images))
        losses = []
        for step in range(steps_per_epoch):
            chosen = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = prep.batch([augment(train.images[i], params, rng) for i in chosen])
            onehot = np.eye(len(classes), dtype=np.float32)[y[chosen]]
            losses.append(float(trainer.train_on_batch([batch, onehot], onehot)))
            if progress:
                progress(
                    "train",
                    epoch * steps_per_epoch + step + 1,
                    config.epochs * steps_per_epoch,
                    {"epoch": epoch + 1, "loss": float(np.mean(losses))},
                )
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if val.images:
            scores = _scores(embed_images(embedder, val.images, prep), val.labels)
            record.update({f"val_{k}": v for k, v in scores.items()})
            key = scores["map_at_r"]
            if best is None or key > best[0]:
                best = (key, embedder.get_weights())
        history.append(record)
        if progress:
            progress("epoch", epoch + 1, config.epochs, record)
    if best is not None:
        embedder.set_weights(best[1])
    embedder.set_weights(artifacts.quantise(embedder.get_weights()))

    # Calibrate on validation patients: the threshold for the configured false-match rate.
    calibration = val if len(set(val.labels)) >= 2 else train
    cal_embeddings = embed_images(embedder, calibration.images, prep)
    pairs, genuine = pair_scores(cosine_similarity(cal_embeddings), calibration.labels)
    threshold = threshold_for_false_match_rate(pairs, genuine, config.false_match_rate)
    metrics = _scores(cal_embeddings, calibration.labels)
    metrics["true_match_rate_at_threshold"] = float((pairs[genuine] >= threshold).mean())
    metrics["false_match_rate_at_threshold"] = float((pairs[~genuine] >= threshold).mean())

    version = version or artifacts.new_version()
    folder = out / f"reid-{config.modality}-{version}"
    description = {
        "kind": "reid",
        "modality": config.modality,
        "version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": artifacts.command_line(),
        "config": {**asdict(config), "augmentation": asdict(config.augmentation())},
        "preprocessing": {
            **asdict(prep),
            "clahe": asdict(pipeline.clahe),
            "decode": asdict(pipeline.decode),
        },
        "threshold": threshold,
        "calibrated_on": "validation" if calibration is val else "training (too few patients)",
        "metrics": metrics,
        "history": history,
        "data": {
            "dataset": str(dataset),
            "patients": len(set(data.labels)),
            "images": len(data.images),
            "train_patients": len(classes),
            "train_images": len(train.images),
            "validation_patients": len(set(val.labels)),
            "validation_images": len(val.images),
            "skipped": [f"{p.name}: {r}" for p, r in data.skipped[:20]],
        },
        "training_seconds": round(time.monotonic() - started, 1),
        "environment": artifacts.environment(),
    }
    artifacts.write_model(folder, description, reid_card(description))
    artifacts.save_weights(folder, embedder.get_weights())
    return TrainedReid(folder, description)


def reid_card(d: dict[str, Any]) -> str:
    m, data, cfg = d["metrics"], d["data"], d["config"]
    return f"""# Re-identification model: {d["modality"]} ({d["version"]})

**What it does.** Embeds a CLAHE-enhanced {d["modality"]} image into a
{cfg["embedding_dim"]}-dimensional unit vector; two images of one patient should have a cosine
similarity above the threshold **{d["threshold"]:.4f}** (calibrated for a false-match rate of
{cfg["false_match_rate"]:.0%} on {d["calibrated_on"]} pairs).

**Trained on** `{data["dataset"]}`: {data["patients"]} patients, {data["images"]} images;
{data["train_patients"]} patients ({data["train_images"]} images) for training,
{data["validation_patients"]} other patients ({data["validation_images"]} images) for
validation. Created {d["created"]} by `{d["command"]}` in {d["training_seconds"]} s.

**Network.** {cfg["backbone"]} (alpha {cfg["alpha"]}, {cfg["size"]} px input, backbone
initialised from `{cfg["backbone_weights"]}`), a linear projection, L2 normalisation; trained
{cfg["epochs"]} epochs with a CosFace loss (scale {cfg["cosface_scale"]}, margin
{cfg["cosface_margin"]}), augmentation {d["config"]["augmentation"]}.

**Validation** (patients unseen in training, each image against all others): P@1
{m["p_at_1"]:.3f}, mAP@R {m["map_at_r"]:.3f}, ROC AUC {m["roc_auc"]:.4f}, EER {m["eer"]:.4f};
at the threshold, true-match rate {m["true_match_rate_at_threshold"]:.3f} and false-match rate
{m["false_match_rate_at_threshold"]:.4f}.

**Reproduce** with `make models` (generated hospital, seed 21) or the command above.

**Limits.** A model is only as good as the images it was trained on. A hospital must train and
evaluate on its own images (`medreid train reid`, `medreid evaluate reid`) before relying on
it; figures on generated data say nothing about real patients.
"""


# --------------------------------------------------------------------------- serving


class ReidModel:
    """A loaded re-identification artifact."""

    def __init__(self, folder: Path) -> None:
        quiet_tensorflow()
        self.folder = folder
        self.description = artifacts.read_model(folder)
        if self.description["kind"] != "reid":
            raise artifacts.ArtifactError(f"{folder} is a {self.description['kind']} model")
        cfg = dict(self.description["config"])
        cfg.pop("augmentation", None)
        if cfg.get("brightness") is not None:
            cfg["brightness"] = tuple(cfg["brightness"])
        self.config = ReidConfig(**cfg)
        self.preprocessing = self.config.preprocessing()
        self.model = build_embedder(self.config, "none")
        self.model.set_weights(artifacts.load_weights(folder))
        self.threshold = float(self.description["threshold"])

    @property
    def version(self) -> str:
        return f"reid-{self.config.modality}-{self.description['version']}"

    def embed(self, images: list[FloatImage]) -> npt.NDArray[np.float32]:
        """Embeddings of enhanced images (any size; they are resized here)."""
        return l2_normalise(embed_images(self.model, images, self.preprocessing))
