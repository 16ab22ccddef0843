"""A linear projection of frozen features, fitted in closed form on training patients.

Within-class whitening (WCCN, Hatch et al. 2006, on a PCA whitening): centre on the training
mean, keep the leading principal directions scaled to unit variance, then whiten the
covariance of images about their own patient's mean. Directions in which one patient's
images vary (position, exposure, breathing) are shrunk; directions in which patients differ
keep their spread. With a few dozen patients this generalises where fine-tuning a network
overfits: it learns dims x dims numbers, not millions. The covariance is shrunk towards the
identity, and the dimension and the shrinkage are chosen by cross-validation over patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.metrics import cosine_similarity, retrieval_scores

DIMS = (32, 64, 128)
SHRINKAGE = (0.1, 0.3, 0.6)


@dataclass(frozen=True)
class Projection:
    """``(features - mean) @ matrix``; compare the results by cosine."""

    mean: npt.NDArray[np.float64]
    matrix: npt.NDArray[np.float64]

    def apply(self, features: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        return np.asarray((np.asarray(features, np.float64) - self.mean) @ self.matrix)

    @property
    def bias(self) -> npt.NDArray[np.float64]:
        """The same map as an affine layer: ``features @ matrix + bias``."""
        return np.asarray(-self.mean @ self.matrix)


@dataclass(frozen=True)
class ProjectionChoice:
    dims: int
    shrinkage: float
    map_at_r: float
    table: list[dict[str, float]]


def fit_within_class_whitening(
    features: npt.NDArray[np.floating], labels: Sequence[str], dims: int, shrinkage: float
) -> Projection:
    """The projection after which the training images' covariance about their patient means
    is the identity (exactly so with ``shrinkage`` 0)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], not {shrinkage}")
    x = np.asarray(features, np.float64)
    names = np.asarray(labels)
    mean = x.mean(axis=0)
    centred = x - mean
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    # Directions beyond the data's rank carry no variance to whiten.
    rank = int((singular > singular[0] * 1e-8).sum()) if singular.size else 0
    dims = max(1, min(dims, rank))
    pca = directions[:dims].T / (singular[:dims] / np.sqrt(len(x)))
    reduced = centred @ pca
    within = np.zeros((dims, dims))
    counted = 0
    for patient in np.unique(names):
        mine = reduced[names == patient]
        if len(mine) < 2:
            continue
        deviations = mine - mine.mean(axis=0)
        within += deviations.T @ deviations
        counted += len(mine)
    if counted == 0:
        raise ValueError("within-class whitening needs a patient with at least two images")
    within = (1.0 - shrinkage) * within / counted + shrinkage * np.eye(dims)
    values, vectors = np.linalg.eigh(within)
    return Projection(mean, pca @ (vectors / np.sqrt(values)))


def select_projection(
    features: npt.NDArray[np.floating],
    labels: Sequence[str],
    *,
    dims: Sequence[int] = DIMS,
    shrinkage: Sequence[float] = SHRINKAGE,
    folds: int = 4,
    seed: int = 0,
) -> ProjectionChoice:
    """Dimension and shrinkage by the mean mAP@R over ``folds`` patient-disjoint folds."""
    x = np.asarray(features, np.float64)
    names = np.asarray(labels)
    patients = np.unique(names)
    np.random.default_rng(seed).shuffle(patients)
    splits = []
    for fold in range(min(folds, len(patients))):
        held = np.isin(names, patients[fold::folds])
        if len(set(names[held])) >= 2 and len(set(names[~held])) >= 1:
            splits.append(held)
    if not splits:
        raise ValueError("cross-validation needs images of at least three patients")
    table: list[dict[str, float]] = []
    for d in dims:
        for s in shrinkage:
            scores = []
            for held in splits:
                projection = fit_within_class_whitening(x[~held], names[~held].tolist(), d, s)
                similarity = cosine_similarity(projection.apply(x[held]))
                scores.append(retrieval_scores(similarity, names[held].tolist()).map_at_r)
            table.append({"dims": d, "shrinkage": s, "cv_map_at_r": float(np.mean(scores))})
    best = max(table, key=lambda row: row["cv_map_at_r"])
    return ProjectionChoice(int(best["dims"]), best["shrinkage"], best["cv_map_at_r"], table)
