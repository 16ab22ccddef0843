"""The closed-form projection of the frozen recipe, on small arrays with known answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from training.metrics import cosine_similarity, retrieval_scores
from training.projection import fit_within_class_whitening, select_projection


def nuisance_set(seed: int, patients: int = 12, images: int = 4) -> tuple[np.ndarray, list[str]]:
    """Patients apart along axes 2-9 (spread 1); each image moved along axes 0-1 by a
    nuisance ten times larger, as position and exposure dwarf identity in raw features; axis
    10 is a constant offset, as in non-negative pooled features."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for p in range(patients):
        identity = np.concatenate([[0.0, 0.0], rng.normal(0, 1, 8), [20.0]])
        for _ in range(images):
            nuisance = np.concatenate([rng.normal(0, 10, 2), np.zeros(9)])
            rows.append(identity + nuisance + rng.normal(0, 0.05, 11))
            labels.append(f"p{p}")
    return np.array(rows), labels


def test_without_shrinkage_the_training_within_patient_covariance_becomes_the_identity() -> None:
    features, labels = nuisance_set(seed=1)
    projection = fit_within_class_whitening(features, labels, dims=10, shrinkage=0.0)
    projected = projection.apply(features)
    names = np.asarray(labels)
    deviations = np.concatenate(
        [projected[names == p] - projected[names == p].mean(axis=0) for p in np.unique(names)]
    )
    np.testing.assert_allclose(deviations.T @ deviations / len(features), np.eye(10), atol=1e-9)
    # The affine form a network layer stores is the same map.
    np.testing.assert_allclose(features @ projection.matrix + projection.bias, projected, atol=1e-9)


def test_the_projection_finds_patients_that_raw_cosine_misses_on_unseen_patients() -> None:
    features, labels = nuisance_set(seed=2)
    unseen, unseen_labels = nuisance_set(seed=3)
    projection = fit_within_class_whitening(features, labels, dims=10, shrinkage=0.1)
    raw = retrieval_scores(cosine_similarity(unseen), unseen_labels)
    projected = retrieval_scores(cosine_similarity(projection.apply(unseen)), unseen_labels)
    assert raw.p_at_1 < 0.5
    assert projected.p_at_1 > 0.95, (raw, projected)


def test_cross_validation_reports_every_setting_and_keeps_the_best() -> None:
    features, labels = nuisance_set(seed=4, patients=16)
    choice = select_projection(features, labels, dims=(2, 10), shrinkage=(0.0, 0.5), folds=4)
    assert [(row["dims"], row["shrinkage"]) for row in choice.table] == [
        (2, 0.0),
        (2, 0.5),
        (10, 0.0),
        (10, 0.5),
    ]
    assert choice.map_at_r == max(row["cv_map_at_r"] for row in choice.table)
    # The two leading principal directions are the nuisance: they hold no identity.
    assert choice.dims == 10


def test_a_set_without_repeat_images_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="at least two images"):
        fit_within_class_whitening(np.eye(5), ["a", "b", "c", "d", "e"], dims=3, shrinkage=0.1)
    with pytest.raises(ValueError, match="shrinkage"):
        fit_within_class_whitening(np.eye(5), list("aabbc"), dims=3, shrinkage=1.5)


def test_selection_survives_folds_whose_rank_is_below_the_dimensions_asked() -> None:
    # 10 patients x 3 images in 64 dimensions: each fold's training rank (about 20) is below
    # 32, and differs between folds.
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 64))
    features = np.repeat(centres, 3, axis=0) + 0.3 * rng.normal(size=(30, 64))
    labels = [f"p{i}" for i in range(10) for _ in range(3)]
    choice = select_projection(features, labels, dims=(32, 64), shrinkage=(0.1,))
    assert [row["dims"] for row in choice.table] == [32, 64]
    assert choice.dims == 32  # the same measurement at both: the smaller is kept
    assert choice.map_at_r > 0.5


def test_out_of_fold_gaps_are_one_per_image_with_a_sibling_and_judge_strangers() -> None:
    from training.metrics import margin_for_gaps, misfiling_gaps
    from training.projection import out_of_fold_scores

    features, labels = nuisance_set(seed=5, patients=16)
    found = out_of_fold_scores(features, labels, dims=10, shrinkage=0.1, folds=4)
    gaps = found.gaps
    # four folds of four patients of four images: 4 x (16 x 15 / 2 - 4 x 6) stranger pairs
    assert found.impostors.shape == (4 * (120 - 24),)
    assert found.genuine.sum() == 4 * 24 and len(found.scores) == 4 * 120
    assert len(found.p_at_1) == len(found.map_at_r) == 4 and min(found.p_at_1) > 0.9
    # every image has three siblings and every fold other patients: each image is a query once
    assert gaps.shape == (len(features),)
    # Fitted without its fold, the projection still puts each image's own patient first...
    assert (gaps < 0).mean() > 0.95
    # ...while the raw features, where the nuisance dominates, put a stranger first for many.
    raw = misfiling_gaps(cosine_similarity(features), labels)
    assert (raw > 0).mean() > 0.3
    # The margin for 1 in 16 lets at most that share of these images reach it.
    margin = margin_for_gaps(gaps, 1 / 16)
    assert (gaps >= margin).sum() <= len(gaps) // 16


def test_out_of_fold_gaps_fit_on_the_other_views_of_the_other_folds_only() -> None:
    from training.projection import out_of_fold_scores

    def out_of_fold_gaps(*args: Any, **kwargs: Any) -> np.ndarray:
        return out_of_fold_scores(*args, **kwargs).gaps

    features, labels = nuisance_set(seed=6, patients=16)
    # A second view of the same images that differs only in the nuisance axes: fitting on it
    # too leaves the identity axes as they were, so the gaps stay those of a good fit.
    rng = np.random.default_rng(7)
    other_view = features + np.concatenate(
        [rng.normal(0, 10, (len(features), 2)), np.zeros((len(features), 9))], axis=1
    )
    alone = out_of_fold_gaps(features, labels, dims=10, shrinkage=0.1, folds=4)
    both = out_of_fold_gaps(
        features, labels, dims=10, shrinkage=0.1, also_fit=[other_view], folds=4
    )
    assert both.shape == alone.shape
    assert (both < 0).mean() > 0.95
    # A view whose rows do not line up with the images is refused, not silently misused.
    with pytest.raises((ValueError, IndexError)):
        out_of_fold_gaps(features, labels, dims=10, shrinkage=0.1, also_fit=[other_view[:-1]])
