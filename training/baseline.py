"""The raw-pixel cosine baseline: how far plain pixels get at telling patients apart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.models.backbone import resize
from pipeline.runner import PipelineConfig
from training.datasets.reader import DatasetItem, iter_images, scan
from training.metrics import cosine_similarity, retrieval_scores, verification_scores


@dataclass(frozen=True)
class BaselineResult:
    modality: str
    n_patients: int
    n_images: int
    p_at_1: float
    map_at_r: float
    roc_auc: float
    eer: float
    p_at_1_other_visits: float  # same-visit images hidden from each query
    unreadable: int


def raw_pixel_vectors(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack([resize(image, size).reshape(-1) for image in images])


def raw_pixel_baseline(
    root: Path,
    *,
    size: int = 64,
    config: PipelineConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[BaselineResult]:
    config = config or PipelineConfig()
    by_modality: dict[str, list[DatasetItem]] = {}
    for item in scan(root):
        by_modality.setdefault(item.modality, []).append(item)
    results = []
    total = sum(len(v) for v in by_modality.values())
    done = 0
    for modality, items in by_modality.items():
        kept: list[DatasetItem] = []
        images = []
        unreadable = 0
        for item, image, _reason in iter_images(items, config):
            done += 1
            if progress:
                progress(done, total)
            if image is None:
                unreadable += 1
                continue
            kept.append(item)
            images.append(image)
        labels = [i.patient_id for i in kept]
        similarity = cosine_similarity(raw_pixel_vectors(images, size))
        retrieval = retrieval_scores(similarity, labels)
        sessions = np.array([f"{i.patient_id}/{i.visit}" for i in kept])
        same_visit = sessions[:, None] == sessions[None, :]
        other_visits = retrieval_scores(similarity, labels, exclude=same_visit)
        verification = verification_scores(similarity, labels)
        results.append(
            BaselineResult(
                modality=modality,
                n_patients=len(set(labels)),
                n_images=len(kept),
                p_at_1=retrieval.p_at_1,
                map_at_r=retrieval.map_at_r,
                roc_auc=verification.roc_auc,
                eer=verification.eer,
                p_at_1_other_visits=other_visits.p_at_1,
                unreadable=unreadable,
            )
        )
    return results
