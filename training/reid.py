"""Training per-modality re-identification: a MobileNet that embeds an image so that images of
one patient lie close together and those of different patients far apart (served by
``pipeline.models.reid``).

Two recipes. ``finetune`` (the default) trains the whole network; ``frozen`` keeps an ImageNet
backbone as it is and fits only a linear projection of its features in closed form
(``training.projection``), for sets of a few dozen patients, where fine-tuning
millions of weights overfits and loses to the untrained backbone.

Fine-tuning is metric learning with a CosFace head (large-margin cosine loss, Wang et al.
2018): each training patient is a class whose weight vector is a prototype on the unit sphere,
and the loss asks every embedding to be closer to its own prototype than to any other by a
margin. It needs no pair or triplet mining, stays stable with the few images per patient a
hospital has, and the embedding it leaves is compared by cosine, as the gallery does. The
classification head is thrown away after training; the threshold is calibrated on validation
patients never seen in training.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.models import artifacts
from pipeline.models.backbone import Preprocessing, build_backbone, quiet_tensorflow, resize
from pipeline.models.reid import (
    EmbedderShape,
    Flip,
    ReidModel,
    build_embedder,
    build_features,
    embed_images,
    flipped,
)
from pipeline.records import FloatImage
from pipeline.runner import PipelineConfig
from pipeline.vectors import l2_normalise
from training.cards import collections_of, reid_card
from training.datasets.augment import AugmentParams, augment
from training.datasets.reader import (
    DatasetItem,
    iter_images,
    made_by_the_generator,
    scan_modality,
)
from training.metrics import (
    EnrolledScores,
    cosine_similarity,
    equal_error_rate,
    margin_for_gaps,
    margins_by_gallery_size,
    misfiling_gaps,
    pair_scores,
    retrieval_scores,
    roc_auc,
    stranger_thresholds,
    threshold_for_false_match_rate,
    verification_scores,
)
from training.projection import (
    OutOfFold,
    ProjectionChoice,
    fit_within_class_whitening,
    out_of_fold_scores,
    select_projection,
)

# Horizontal flips change anatomy (the heart's side, the liver's); only dermoscopy is
# free of a left and right.
DEFAULT_FLIP = {"xray": False, "ct": False, "mri": False, "dermoscopy": True}
RECIPES = ("finetune", "frozen")
# Below this many training patients, the real chest X-rays measured in docs/models.md
# (62 patients) were better served by the frozen recipe.
FEW_PATIENTS = 100
log = logging.getLogger(__name__)
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
    recipe: str = "finetune"
    # > 0: a within-class whitening of the unit embeddings follows (medreid train whitening).
    whitening_dim: int = 0
    # The frozen recipe only: inner layers pooled on a grid (pipeline.models.reid).
    feature_layers: tuple[str, ...] = ()
    grid: int = 1
    # The frozen recipe only: features averaged over the image and these flips of it...
    flips: tuple[str, ...] = ()
    # ...and a whitening fitted on these flips of the training images too, as images of the
    # same patient (its dimension and shrinkage are chosen on the images as they are).
    fit_flips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        if self.feature_layers and self.recipe != "frozen":
            raise ValueError("feature layers pooled on a grid need --recipe frozen")
        if self.grid < 1:
            raise ValueError(f"grid must be 1 or more, not {self.grid}")
        unknown = sorted((set(self.flips) | set(self.fit_flips)) - set(Flip))
        if unknown:
            raise ValueError(f"unknown flips {', '.join(unknown)}; choose from {', '.join(Flip)}")
        if (self.flips or self.fit_flips) and self.recipe != "frozen":
            raise ValueError(
                "features averaged over flips, or fitted on them, need --recipe frozen"
            )

    def augmentation(self) -> AugmentParams:
        flip = DEFAULT_FLIP.get(self.modality, False)
        if self.horizontal_flip is not None:
            flip = self.horizontal_flip
        return AugmentParams(self.rotation_deg, self.zoom, flip, self.brightness)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing.for_backbone(self.backbone, self.size)

    def shape(self) -> EmbedderShape:
        return EmbedderShape.of(asdict(self))

    @classmethod
    def of(cls, config: dict[str, Any]) -> ReidConfig:
        """The config a model description records (its augmentation is derived, not read)."""
        fields = dict(config)
        fields.pop("augmentation", None)
        if fields.get("brightness") is not None:
            fields["brightness"] = tuple(fields["brightness"])
        fields["feature_layers"] = tuple(fields.get("feature_layers") or ())
        fields["flips"] = tuple(fields.get("flips") or ())
        fields["fit_flips"] = tuple(fields.get("fit_flips") or ())
        return cls(**fields)


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


def _finetune(
    config: ReidConfig,
    train: LoadedSet,
    val: LoadedSet,
    prep: Preprocessing,
    progress: Progress | None,
) -> tuple[Any, list[dict[str, float]]]:
    """The whole network trained with the CosFace loss; the epoch with the best validation
    mAP@R is kept."""
    import keras

    classes = sorted(set(train.labels))
    class_of = {p: i for i, p in enumerate(classes)}
    y = np.array([class_of[p] for p in train.labels])
    embedder = build_embedder(config.shape(), config.backbone_weights)
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
    return embedder, history


def _feature_progress(progress: Progress | None) -> Callable[[int, int], None] | None:
    """Images embedded so far, reported as the "features" phase."""
    if progress is None:
        return None
    return lambda done, total: progress("features", done, total, {})


def _choose_projection(
    features: npt.NDArray[np.float32], labels: list[str], seed: int, progress: Progress | None
) -> ProjectionChoice:
    choice = select_projection(features, labels, seed=seed)
    if progress:
        progress(
            "fit",
            1,
            1,
            {"dims": choice.dims, "shrinkage": choice.shrinkage, "cv_map_at_r": choice.map_at_r},
        )
    return choice


def _rates_at(
    pairs: npt.NDArray[np.float64], genuine: npt.NDArray[np.bool_], threshold: float
) -> dict[str, float]:
    return {
        "true_match_rate_at_threshold": float((pairs[genuine] >= threshold).mean()),
        "false_match_rate_at_threshold": float((pairs[~genuine] >= threshold).mean()),
    }


def _gallery_calibration(
    gaps: npt.NDArray[np.float64],
    enrolled: EnrolledScores,
    impostors: npt.NDArray[np.float64],
    rate: float,
) -> dict[str, Any]:
    """A model's ``margin``, ``margins`` and ``stranger_thresholds`` from one pool of
    calibration images: their misfiling gaps, their scores judged as the service judges, and
    their stranger pairs (None where the pool is empty)."""
    return {
        "margin": margin_for_gaps(gaps, rate) if len(gaps) else None,
        "margins": (
            margins_by_gallery_size(enrolled, rate)
            if len(enrolled.own) and len(enrolled.strangers)
            else None
        ),
        "stranger_thresholds": stranger_thresholds(impostors, rate) if len(impostors) else None,
    }


def _fit_frozen(
    config: ReidConfig, train: LoadedSet, prep: Preprocessing, progress: Progress | None
) -> tuple[Any, list[dict[str, float]], ReidConfig, OutOfFold | None]:
    """The ImageNet backbone as it is, and a within-class whitening of its features (its global
    pool, or inner layers pooled on a grid) fitted on the training patients, its dimension and
    shrinkage chosen by cross-validation over them; and what the training images say of
    strangers under the same fit made without their fold, for the margin's and the stranger
    thresholds' calibration."""
    if config.backbone_weights in ("none", ""):
        log.warning(
            "the frozen recipe keeps the backbone's weights as they are: with "
            "--backbone-weights none they are random and so are its features"
        )
    backbone = build_backbone(config.backbone, config.alpha, config.size, config.backbone_weights)
    extractor = build_features(config.shape(), "none", backbone=backbone)
    features = embed_images(extractor, train.images, prep, progress=_feature_progress(progress))
    choice = _choose_projection(features, train.labels, config.seed, progress)
    also_fit = [
        embed_images(
            extractor,
            [flipped(image, Flip(flip)) for image in train.images],
            prep,
            progress=_feature_progress(progress),
        )
        for flip in config.fit_flips
    ]
    projection = fit_within_class_whitening(
        np.concatenate([features, *also_fit]),
        list(train.labels) * (1 + len(also_fit)),
        choice.dims,
        choice.shrinkage,
    )
    try:
        out_of_fold: OutOfFold | None = out_of_fold_scores(
            features,
            train.labels,
            choice.dims,
            choice.shrinkage,
            also_fit=also_fit,
            seed=config.seed,
        )
    except ValueError:  # too few patients for folds
        out_of_fold = None
    fitted = replace(config, embedding_dim=projection.matrix.shape[1])
    embedder = build_embedder(fitted.shape(), "none", backbone=backbone)
    embedder.get_layer("projection").set_weights(
        [projection.matrix.astype(np.float32), projection.bias.astype(np.float32)]
    )
    history = [
        {**row, "chosen": float((row["dims"], row["shrinkage"]) == (choice.dims, choice.shrinkage))}
        for row in choice.table
    ]
    return embedder, history, fitted, out_of_fold


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

    if config.recipe == "finetune" and len(set(train.labels)) < FEW_PATIENTS:
        log.warning(
            "%d training patients: fine-tuning a whole network on so few tends to overfit "
            "and lose to the untrained backbone; compare --recipe frozen (medreid evaluate reid)",
            len(set(train.labels)),
        )
    out_of_fold: OutOfFold | None = None
    if config.recipe == "frozen":
        embedder, history, config, out_of_fold = _fit_frozen(config, train, prep, progress)
    else:
        embedder, history = _finetune(config, train, val, prep, progress)
    embedder.set_weights(artifacts.quantise(embedder.get_weights()))

    # Calibrate on validation patients: the threshold for the configured false-match rate.
    calibration = val if len(set(val.labels)) >= 2 else train
    cal_embeddings = embed_images(embedder, calibration.images, prep)
    cal_similarity = cosine_similarity(cal_embeddings)
    pairs, genuine = pair_scores(cal_similarity, calibration.labels)
    threshold = threshold_for_false_match_rate(pairs, genuine, config.false_match_rate)
    metrics = {
        **_scores(cal_embeddings, calibration.labels),
        **_rates_at(pairs, genuine, threshold),
    }
    # The margin's quantile needs many more images than the threshold's (one gap per image,
    # not per pair): the validation images' gaps under the served model are pooled with the
    # training images' gaps out of fold, where the recipe allows it.
    served_gaps, served_enrolled, served_impostors = (
        misfiling_gaps(cal_similarity, calibration.labels),
        [EnrolledScores.of(cal_similarity, calibration.labels)],
        pairs[~genuine],
    )
    if calibration is train and out_of_fold is not None:
        # in-sample scores would understate a stranger's
        served_gaps, served_enrolled, served_impostors = np.zeros(0), [], np.zeros(0)
    # the same pooling for the best of a gallery of strangers, for header patients who are
    # not enrolled, and for the margin a gallery of a hospital's size needs
    empty = np.zeros(0)
    gaps = np.concatenate([served_gaps, out_of_fold.gaps if out_of_fold else empty])
    by_gallery = _gallery_calibration(
        gaps,
        EnrolledScores.joined(served_enrolled + ([out_of_fold.enrolled] if out_of_fold else [])),
        np.concatenate([served_impostors, out_of_fold.impostors if out_of_fold else empty]),
        config.false_match_rate,
    )

    version = version or artifacts.new_version()
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
        # Another identity beating an image's own by `margin` flagged 1% of the calibration
        # images; a larger gallery needs more (docs/models.md): `margins`, by gallery size,
        # where the service judges by the margin.
        **by_gallery,
        "margin_calibrated_on": {
            f"{'validation' if calibration is val else 'training'}_images": len(served_gaps),
            "out_of_fold_training_images": len(out_of_fold.gaps) if out_of_fold else 0,
        },
        "calibrated_on": "validation" if calibration is val else "training (too few patients)",
        "metrics": metrics,
        "history": history,
        "data": {
            "dataset": str(dataset),
            "patients": len(set(data.labels)),
            "images": len(data.images),
            "collections": _collections(data.labels, dataset),
            "train_patients": len(set(train.labels)),
            "train_images": len(train.images),
            "validation_patients": len(set(val.labels)),
            "validation_images": len(val.images),
            "skipped": [f"{p.name}: {r}" for p, r in data.skipped[:20]],
        },
        "training_seconds": round(time.monotonic() - started, 1),
        "environment": artifacts.environment(),
    }
    return _save(out, description, embedder)


def _save(out: Path, description: dict[str, Any], embedder: Any) -> TrainedReid:
    folder = out / artifacts.model_name(description)
    artifacts.write_model(folder, description, reid_card(description))
    artifacts.save_weights(folder, embedder.get_weights())
    return TrainedReid(folder, description)


def _collections(labels: list[str], dataset: Path) -> dict[str, int]:
    """Images per collection of a training or whitening set (training.cards.collection)."""
    return collections_of(labels, generated=made_by_the_generator(dataset))


def _network_and_record(model: ReidModel, config: ReidConfig) -> tuple[Any, dict[str, Any]]:
    """``model``'s fine-tuned network without any whitening it ends in, and that network's
    name, figures and command as a whitening records them, so that a whitening fitted again
    replaces the old one instead of following it."""
    if config.recipe == "frozen":
        raise ValueError(
            f"{model.folder.name} is a fitted projection of ImageNet features, not a fine-tuned "
            "network; train it again on the new patients instead"
        )
    if config.whitening_dim:
        network = build_embedder(replace(config, whitening_dim=0).shape(), "none")
        # The whitening is the last dense layer: its matrix and bias are the last two weights.
        network.set_weights(model.model.get_weights()[:-2])
        return network, model.description["whitening"]
    d = model.description
    return model.model, {
        "base_model": model.version,
        "base_metrics": d["metrics"],
        "base_threshold": d["threshold"],
        "base_command": d["command"],
        "base_training_seconds": d["training_seconds"],
    }


def whiten_reid(
    base: Path,
    dataset: Path,
    out: Path,
    *,
    version: str | None = None,
    pipeline: PipelineConfig | None = None,
    progress: Progress | None = None,
) -> TrainedReid:
    """A trained model followed by a within-class whitening of its embeddings, fitted on the
    patients of ``dataset``, whom its network never saw.

    A network trained on some patients leaves, on others, embeddings whose within-patient
    spread still has preferred directions; whitening it is cheap and learned from images alone.
    Dimension and shrinkage are chosen by cross-validation over the patients; the threshold and
    the metrics come from each fold's pairs under a whitening fitted without that fold, so they
    describe patients the whitening never saw either. The final whitening uses every patient.
    A model that already ends in a whitening has it replaced: the new one follows its network.
    """
    started = time.monotonic()
    model = ReidModel(base)
    config = ReidConfig.of(model.description["config"])
    network, network_record = _network_and_record(model, config)
    pipeline = pipeline or PipelineConfig()
    data = load_set(scan_modality(dataset, config.modality), config.size, pipeline)
    if len(set(data.labels)) < 8:
        raise ValueError(f"{dataset} needs images of at least 8 patients to fit a whitening")
    embeddings = l2_normalise(
        embed_images(
            network, data.images, model.preprocessing, progress=_feature_progress(progress)
        )
    )
    choice = _choose_projection(embeddings, data.labels, config.seed, progress)
    # The threshold, the metrics, and the margin (the base's measured other embeddings) from
    # the same folds.
    out_of_fold = out_of_fold_scores(
        embeddings, data.labels, choice.dims, choice.shrinkage, seed=config.seed
    )
    pairs, genuine = out_of_fold.scores, out_of_fold.genuine
    threshold = threshold_for_false_match_rate(pairs, genuine, config.false_match_rate)
    metrics = {
        "p_at_1": float(np.mean(out_of_fold.p_at_1)),
        "map_at_r": float(np.mean(out_of_fold.map_at_r)),
        "roc_auc": roc_auc(pairs, genuine),
        "eer": equal_error_rate(pairs, genuine)[0],
        **_rates_at(pairs, genuine, threshold),
    }
    projection = fit_within_class_whitening(embeddings, data.labels, choice.dims, choice.shrinkage)
    whitened = replace(config, whitening_dim=projection.matrix.shape[1])
    embedder = build_embedder(whitened.shape(), "none")
    embedder.set_weights(
        artifacts.quantise(
            [
                *network.get_weights(),
                projection.matrix.astype(np.float32),
                projection.bias.astype(np.float32),
            ]
        )
    )
    version = version or artifacts.new_version()
    description = {
        **model.description,
        "version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": artifacts.command_line(),
        "config": {**model.description["config"], "whitening_dim": whitened.whitening_dim},
        "threshold": threshold,
        **_gallery_calibration(
            out_of_fold.gaps, out_of_fold.enrolled, out_of_fold.impostors, config.false_match_rate
        ),
        "margin_calibrated_on": {"out_of_fold_whitening_set_images": len(out_of_fold.gaps)},
        "calibrated_on": "out-of-fold whitening-set",
        "metrics": metrics,
        "whitening": {
            "base_model": network_record["base_model"],
            "base_metrics": network_record["base_metrics"],
            "base_threshold": network_record["base_threshold"],
            "dataset": str(dataset),
            "patients": len(set(data.labels)),
            "images": len(data.images),
            "collections": _collections(data.labels, dataset),
            "dims": choice.dims,
            "shrinkage": choice.shrinkage,
            "cross_validation": choice.table,
            "base_command": network_record["base_command"],
            "base_training_seconds": network_record["base_training_seconds"],
        },
        "training_seconds": round(time.monotonic() - started, 1),
        "environment": artifacts.environment(),
    }
    return _save(out, description, embedder)
