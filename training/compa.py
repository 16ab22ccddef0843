"""Training COMPA (``pipeline.models.compa`` says what it is): features of the training images,
k-means references per modality and source, and the temperature and `other` logit fitted on
held-out patients.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.models import artifacts
from pipeline.models.backbone import build_backbone, quiet_tensorflow
from pipeline.models.compa import (
    KNOWN,
    OTHER,
    CompaModel,
    FeatureExtractor,
    softmax_with_other,
)
from pipeline.runner import PipelineConfig
from pipeline.vectors import l2_normalise
from training.cards import collection, compa_card
from training.datasets.reader import DatasetItem, made_by_the_generator, scan
from training.reid import load_set

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CompaConfig:
    backbone_weights: str = "none"
    size: int = 128
    prototypes: int = 4
    validation_fraction: float = 0.25
    # share of known images the `other` reference may reject (chosen by identity-disjoint
    # cross-validation on the real images: benchmarks/compa_cv.py)
    other_quantile: float = 0.005
    seed: int = 0
    refit: bool = True  # the references again from every training patient, once calibrated


def kmeans(
    points: npt.NDArray[np.float32], k: int, seed: int, rounds: int = 30
) -> npt.NDArray[np.float32]:
    """Spherical k-means: unit prototypes."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(points)))
    centres = points[rng.choice(len(points), size=k, replace=False)]
    for _ in range(rounds):
        nearest = np.argmax(points @ centres.T, axis=1)
        for j in range(k):
            members = points[nearest == j]
            if len(members):
                centres[j] = members.mean(axis=0)
        centres = l2_normalise(centres)
    return centres


def _nll(probabilities: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    return float(-np.log(probabilities[np.arange(len(labels)), labels] + 1e-12).mean())


def fit_calibration(
    similarity: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], other_quantile: float
) -> tuple[float, float]:
    """Temperature and `other` logit from held-out images.

    ``labels`` index KNOWN, or len(KNOWN) for `other` examples. Without `other` examples the
    `other` logit is the ``other_quantile`` of the known images' best similarity and only the
    temperature is fitted; with them, both minimise the negative log-likelihood."""
    known = labels < len(KNOWN)
    anchor = float(np.quantile(similarity.max(axis=1)[known], other_quantile))
    others = np.array([anchor])
    if (~known).any():
        others = np.linspace(anchor - 0.2, anchor + 0.2, 41)
    best = (float("inf"), 0.05, anchor)
    for temperature in np.geomspace(0.002, 0.5, 50):
        for other in others:
            probabilities = softmax_with_other(similarity, float(temperature), float(other))
            nll = _nll(probabilities, labels)
            if nll < best[0]:
                best = (nll, float(temperature), float(other))
    return best[1], best[2]


@dataclass(frozen=True)
class TrainedCompa:
    folder: Path
    description: dict[str, Any]


def split_patients_per_modality(
    items: list[DatasetItem], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Patient-disjoint within each modality."""
    rng = np.random.default_rng(seed)
    held: set[tuple[str, str]] = set()
    for modality in sorted({i.modality for i in items}):
        patients = sorted({i.patient_id for i in items if i.modality == modality})
        rng.shuffle(patients)
        held |= {(modality, p) for p in patients[: max(1, round(len(patients) * fraction))]}
    train = [n for n, i in enumerate(items) if (i.modality, i.patient_id) not in held]
    val = [n for n, i in enumerate(items) if (i.modality, i.patient_id) in held]
    return train, val


@dataclass
class CompaFeatures:
    """The training images' backbone features, extracted once: a fit on any subset of them
    (a cross-validation fold, say) costs no second pass through the network."""

    items: list[DatasetItem]
    features: npt.NDArray[np.float32]
    modality: npt.NDArray[np.str_]
    source: npt.NDArray[np.int64]  # which of the datasets each image came from
    collection: npt.NDArray[np.str_]  # and which collection of it (training.cards.collection)
    skipped: list[tuple[Path, str]]
    extractor: FeatureExtractor
    backbone: Any


def compa_features(
    config: CompaConfig,
    datasets: list[Path],
    *,
    pipeline: PipelineConfig | None = None,
    progress: Progress | None = None,
) -> CompaFeatures:
    """The modality folders of ``datasets`` (and their `other` folders) through the service's
    decode and CLAHE, and the ImageNet backbone."""
    quiet_tensorflow()
    items: list[DatasetItem] = []
    source_of: dict[Path, int] = {}
    collection_of: dict[Path, str] = {}
    sources: dict[tuple[int, str], int] = {}
    for number, root in enumerate(datasets):
        generated = made_by_the_generator(root)
        for item in scan(root):
            if item.modality in (*KNOWN, OTHER):
                items.append(item)
                # one source a dataset and, within it, a collection ("kermany_person12" and
                # "nih_00012" are two): each gets references of its own
                collection_of[item.path] = collection(item.patient_id, generated=generated)
                key = (number, collection_of[item.path])
                source_of[item.path] = sources.setdefault(key, len(sources))
    missing = [m for m in KNOWN if not any(i.modality == m for i in items)]
    if missing:
        raise ValueError(f"no images for {', '.join(missing)} in {', '.join(map(str, datasets))}")
    data = load_set(items, config.size, pipeline or PipelineConfig())
    backbone = build_backbone("mobilenet_v2", 1.0, config.size, config.backbone_weights)
    extractor = FeatureExtractor(backbone, config.size)
    features = []
    for start in range(0, len(data.images), 64):
        features.append(extractor(data.images[start : start + 64]))
        if progress:
            progress("features", min(start + 64, len(data.images)), len(data.images))
    return CompaFeatures(
        items=data.items,
        features=np.concatenate(features),
        modality=np.array([i.modality for i in data.items]),
        source=np.array([source_of[i.path] for i in data.items], dtype=np.int64),
        collection=np.array([collection_of[i.path] for i in data.items]),
        skipped=data.skipped,
        extractor=extractor,
        backbone=backbone,
    )


def fit_compa(
    found: CompaFeatures, train_idx: list[int], val_idx: list[int], config: CompaConfig
) -> tuple[CompaModel, float]:
    """References from ``train_idx`` (k-means per modality and source), the temperature and
    `other` logit fitted on ``val_idx``; the model and its accuracy on ``val_idx``."""
    feats, modality = found.features, found.modality
    known_train = [n for n in train_idx if modality[n] != OTHER]
    mean = feats[known_train].mean(axis=0)
    scale = feats[known_train].std(axis=0) + 1e-3
    model = CompaModel(found.extractor, mean, scale, {}, 0.05, 0.0)
    model.prototypes = _references(found, model.embed(feats), known_train, config)
    label_index = {m: i for i, m in enumerate((*KNOWN, OTHER))}
    val_labels = np.array([label_index[modality[n]] for n in val_idx])
    similarity = model.similarities(feats[val_idx])
    model.temperature, model.other_logit = fit_calibration(
        similarity, val_labels, config.other_quantile
    )
    predictions = np.argmax(model.probabilities(similarity), axis=1)
    accuracy = float((predictions == val_labels).mean())
    if config.refit:
        # the calibration's patients join the references once they have served it: where
        # a modality has a handful of real patients (CT here), each one's views count
        every = known_train + [n for n in val_idx if modality[n] != OTHER]
        model.prototypes = _references(found, model.embed(feats), every, config)
    return model, accuracy


def _references(
    found: CompaFeatures,
    unit: npt.NDArray[np.float32],
    members_of: list[int],
    config: CompaConfig,
) -> dict[str, npt.NDArray[np.float32]]:
    """k-means references per modality and source."""
    modality, source = found.modality, found.source
    references = {}
    for m in KNOWN:
        per_source = []
        for s in sorted(set(source[[n for n in members_of if modality[n] == m]])):
            members = [n for n in members_of if modality[n] == m and source[n] == s]
            per_source.append(kmeans(unit[members], config.prototypes, config.seed))
        references[m] = np.concatenate(per_source)
    return references


def train_compa(
    config: CompaConfig,
    datasets: list[Path],
    out: Path,
    *,
    version: str | None = None,
    pipeline: PipelineConfig | None = None,
    progress: Progress | None = None,
) -> TrainedCompa:
    """References from the modality folders of ``datasets`` (their `other` folders, if any,
    only calibrate the `other` logit)."""
    started = time.monotonic()
    pipeline = pipeline or PipelineConfig()
    found = compa_features(config, datasets, pipeline=pipeline, progress=progress)
    train_idx, val_idx = split_patients_per_modality(
        found.items, config.validation_fraction, config.seed
    )
    model, accuracy = fit_compa(found, train_idx, val_idx, config)
    backbone, modality, mean, scale = found.backbone, found.modality, model.mean, model.scale
    backbone.set_weights(artifacts.quantise(backbone.get_weights()))

    version = version or artifacts.new_version()
    description = {
        "kind": "compa",
        "modality": "all",
        "version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": artifacts.command_line(),
        "config": asdict(config),
        "preprocessing": {
            "size": config.size,
            "clahe": asdict(pipeline.clahe),
            "decode": asdict(pipeline.decode),
        },
        "temperature": model.temperature,
        "other_logit": model.other_logit,
        "metrics": {"accuracy": accuracy, "validation_images": len(val_idx)},
        "data": {
            "datasets": [str(d) for d in datasets],
            "images": {m: int((modality == m).sum()) for m in (*KNOWN, OTHER)},
            "collections": dict(sorted(Counter(found.collection.tolist()).items())),
            "skipped": [f"{p.name}: {r}" for p, r in found.skipped[:20]],
        },
        "training_seconds": round(time.monotonic() - started, 1),
        "environment": artifacts.environment(),
    }
    folder = out / artifacts.model_name(description)
    artifacts.write_model(folder, description, compa_card(description))
    artifacts.save_weights(folder, backbone.get_weights())
    np.savez_compressed(
        folder / "references.npz",
        mean=mean,
        scale=scale,
        **{f"prototypes_{m}": model.prototypes[m] for m in KNOWN},  # type: ignore[arg-type]
    )
    return TrainedCompa(folder, description)
