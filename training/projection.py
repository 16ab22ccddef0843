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

from training.metrics import (
    EnrolledScores,
    cosine_similarity,
    misfiling_gaps,
    pair_scores,
    retrieval_scores,
)

# The real-image X-ray models chose 256 and 0.1, dermoscopy 256 and 0.01-0.02, inside the grid
# (docs/models.md).
DIMS = (32, 64, 128, 256)
SHRINKAGE = (0.01, 0.02, 0.05, 0.1, 0.3, 0.6)


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


@dataclass(frozen=True)
class _Principal:
    """The principal directions of a set of features, computed once for every projection
    fitted on them."""

    mean: npt.NDArray[np.float64]
    centred: npt.NDArray[np.float64]
    singular: npt.NDArray[np.float64]
    directions: npt.NDArray[np.float64]
    rank: int

    @classmethod
    def of(cls, features: npt.NDArray[np.floating]) -> _Principal:
        """By a thin SVD: the served projection's route. The principal directions' signs are
        LAPACK's, and every released model's embeddings rest on them, so retraining a
        released model with this route reproduces its embeddings."""
        x = np.asarray(features, np.float64)
        mean = x.mean(axis=0)
        centred = x - mean
        _, singular, directions = np.linalg.svd(centred, full_matrices=False)
        # Directions beyond the data's rank carry no variance to whiten.
        rank = int((singular > singular[0] * 1e-8).sum()) if singular.size else 0
        return cls(mean, centred, singular, directions, rank)

    @classmethod
    def by_gram(cls, features: npt.NDArray[np.floating]) -> _Principal:
        """By the eigenvectors of the smaller Gram matrix (images x images, or features x
        features): a matrix product and a symmetric eigensolver, four to six times faster
        than a thin SVD of thousands of images by thousands of pooled features, and the same
        to 1e-15 for the leading directions the whitening keeps, up to their signs. Scores,
        which do not depend on those signs, are measured this way (cross-validation and the
        out-of-fold calibration); the served projection is fitted by ``of``."""
        x = np.asarray(features, np.float64)
        mean = x.mean(axis=0)
        centred = x - mean
        n, d = centred.shape
        if n >= d:
            values, vectors = np.linalg.eigh(centred.T @ centred)
        else:
            values, vectors = np.linalg.eigh(centred @ centred.T)
        values, vectors = values[::-1], vectors[:, ::-1]
        singular = np.sqrt(np.clip(values, 0.0, None))
        # Directions beyond the data's rank carry no variance to whiten; squared singular
        # values hold their rounding (about n * eps of the largest) below this.
        rank = int((singular > singular[0] * 1e-5).sum()) if singular.size and singular[0] else 0
        singular = singular[:rank]
        # the features' own eigenvectors, or the images' mapped back onto the features
        wide = n < d
        directions = (centred.T @ vectors[:, :rank] / singular).T if wide else vectors[:, :rank].T
        return cls(mean, centred, singular, directions, rank)


def fit_within_class_whitening(
    features: npt.NDArray[np.floating], labels: Sequence[str], dims: int, shrinkage: float
) -> Projection:
    """The projection after which the training images' covariance about their patient means
    is the identity (exactly so with ``shrinkage`` 0)."""
    return _whitening(_Principal.of(features), labels, dims, shrinkage)


def _whitening(
    principal: _Principal, labels: Sequence[str], dims: int, shrinkage: float
) -> Projection:
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], not {shrinkage}")
    names = np.asarray(labels)
    n = len(principal.centred)
    dims = max(1, min(dims, principal.rank))
    pca = principal.directions[:dims].T / (principal.singular[:dims] / np.sqrt(n))
    reduced = principal.centred @ pca
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
    return Projection(principal.mean, pca @ (vectors / np.sqrt(values)))


def patient_folds(
    labels: Sequence[str], folds: int = 4, seed: int = 0
) -> list[npt.NDArray[np.bool_]]:
    """Masks of held-out images, one per fold; no patient is on both sides of a fold."""
    names = np.asarray(labels)
    patients = np.unique(names)
    np.random.default_rng(seed).shuffle(patients)
    masks = []
    for fold in range(min(folds, len(patients))):
        held = np.isin(names, patients[fold::folds])
        if len(set(names[held])) >= 2 and (~held).any():
            masks.append(held)
    if not masks:
        raise ValueError("cross-validation needs images of at least three patients")
    return masks


@dataclass(frozen=True)
class OutOfFold:
    """Each fold's images judged under a projection fitted without them, pooled: figures,
    a threshold, a margin and stranger thresholds for patients the fit never saw."""

    scores: npt.NDArray[np.float64]  # every pair within a fold
    genuine: npt.NDArray[np.bool_]  # which of them are of one patient
    gaps: npt.NDArray[np.float64]  # misfiling gaps (training.metrics.misfiling_gaps)
    enrolled: EnrolledScores  # each fold judged as the service judges, for the margins
    p_at_1: list[float]  # per fold
    map_at_r: list[float]  # per fold

    @property
    def impostors(self) -> npt.NDArray[np.float64]:
        """The scores of pairs of images of two patients."""
        return self.scores[~self.genuine]


def out_of_fold_scores(
    features: npt.NDArray[np.floating],
    labels: Sequence[str],
    dims: int,
    shrinkage: float,
    *,
    also_fit: Sequence[npt.NDArray[np.floating]] = (),
    folds: int = 4,
    seed: int = 0,
) -> OutOfFold:
    """Every fold's pair scores, misfiling gaps, P@1 and mAP@R, from one fit per fold.
    ``also_fit`` are the same images seen another way (flipped, say), row for row: the other
    folds' rows of them join the fit, as they join the served model's."""
    x = np.asarray(features, np.float64)
    names = np.asarray(labels)
    scores, genuine, gaps, enrolled, p_at_1, map_at_r = [], [], [], [], [], []
    for held in patient_folds(labels, folds, seed):
        fit_on = np.concatenate([x[~held]] + [np.asarray(v, np.float64)[~held] for v in also_fit])
        fit_labels = names[~held].tolist() * (1 + len(also_fit))
        projection = _whitening(_Principal.by_gram(fit_on), fit_labels, dims, shrinkage)
        similarity = cosine_similarity(projection.apply(x[held]))
        held_labels = names[held].tolist()
        fold_scores, fold_genuine = pair_scores(similarity, held_labels)
        scores.append(fold_scores)
        genuine.append(fold_genuine)
        gaps.append(misfiling_gaps(similarity, held_labels))
        enrolled.append(EnrolledScores.of(similarity, held_labels))
        retrieval = retrieval_scores(similarity, held_labels)
        p_at_1.append(retrieval.p_at_1)
        map_at_r.append(retrieval.map_at_r)
    return OutOfFold(
        np.concatenate(scores),
        np.concatenate(genuine),
        np.concatenate(gaps),
        EnrolledScores.joined(enrolled),
        p_at_1,
        map_at_r,
    )


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
    found: dict[tuple[int, float], list[float]] = {}
    for held in patient_folds(labels, folds, seed):
        principal = _Principal.by_gram(x[~held])
        measured: dict[tuple[int, float], float] = {}
        for d in dims:
            for s in shrinkage:
                # A dimension beyond this fold's rank is the rank: measured once.
                key = (min(d, principal.rank), s)
                if key not in measured:
                    projection = _whitening(principal, names[~held].tolist(), *key)
                    similarity = cosine_similarity(projection.apply(x[held]))
                    measured[key] = retrieval_scores(similarity, names[held].tolist()).map_at_r
                found.setdefault((d, s), []).append(measured[key])
    # Ties go to the smaller dimension, listed first.
    table = [
        {"dims": d, "shrinkage": s, "cv_map_at_r": float(np.mean(values))}
        for (d, s), values in found.items()
    ]
    best = max(table, key=lambda row: row["cv_map_at_r"])
    return ProjectionChoice(int(best["dims"]), best["shrinkage"], best["cv_map_at_r"], table)
