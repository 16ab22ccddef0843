"""The model toolkit: training beats the raw-pixel baseline, artifacts round-trip exactly,
COMPA tells modalities apart. Small data, few epochs: the models are the subject here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets.baseline import raw_pixel_vectors
from pipeline.datasets.reader import scan_modality
from pipeline.datasets.synthetic import SynthOptions, generate
from pipeline.metrics import cosine_similarity, retrieval_scores
from pipeline.models.artifacts import list_models, read_model
from pipeline.models.reid import ReidConfig, ReidModel, load_set, train_reid

WEIGHTS = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "weights"
    / "mobilenet_v2_1.0_224_torchvision_imagenet.weights.h5"
)
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason="ImageNet MobileNetV2 weights are not beside this checkout"
)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    generate(
        SynthOptions(
            out=out,
            patients=16,
            visits=3,
            seed=31,
            slices=1,
            modalities=("dermoscopy", "xray", "ct", "mri"),
        )
    )
    return out


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unseen")
    generate(
        SynthOptions(out=out, patients=10, visits=3, seed=32, slices=1, modalities=("dermoscopy",))
    )
    return out


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ReidConfig(
        modality="dermoscopy",
        size=96,
        epochs=6,
        backbone_weights=str(WEIGHTS) if WEIGHTS.is_file() else "none",
        seed=1,
    )
    result = train_reid(
        config, tiny / "dermoscopy", tmp_path_factory.mktemp("models"), version="t1"
    )
    return result.folder


@needs_weights
def test_a_short_training_beats_the_raw_pixel_baseline_on_unseen_patients(
    trained: Path, unseen: Path
) -> None:
    model = ReidModel(trained)
    data = load_set(scan_modality(unseen / "dermoscopy", "dermoscopy"), 96)
    learned = retrieval_scores(cosine_similarity(model.embed(data.images)), data.labels)
    raw = retrieval_scores(cosine_similarity(raw_pixel_vectors(data.images, 64)), data.labels)
    assert learned.p_at_1 > raw.p_at_1 + 0.1, (learned, raw)


@needs_weights
def test_the_artifact_round_trips_to_identical_embeddings(trained: Path, unseen: Path) -> None:
    description = read_model(trained)
    assert description["kind"] == "reid" and description["modality"] == "dermoscopy"
    assert 0.0 < description["threshold"] <= 1.0
    assert description["data"]["train_patients"] + description["data"]["validation_patients"] == 16
    assert (trained / "MODEL_CARD.md").read_text().count("Trained on") == 1
    data = load_set(scan_modality(unseen / "dermoscopy", "dermoscopy")[:8], 96)
    first = ReidModel(trained).embed(data.images)
    second = ReidModel(trained).embed(data.images)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    listed = list_models(trained.parent)
    assert [m.name for m in listed] == [trained.name]


def test_patient_split_is_disjoint() -> None:
    from pipeline.models.reid import patient_split

    labels = [f"p{i // 3}" for i in range(30)]
    train, val = patient_split(labels, 0.2, seed=0)
    assert {labels[i] for i in train}.isdisjoint({labels[i] for i in val})
    assert len(train) + len(val) == 30 and len({labels[i] for i in val}) == 2


@needs_weights
def test_compa_tells_the_four_modalities_apart(tiny: Path, tmp_path: Path) -> None:
    from pipeline.models.compa import CompaConfig, load_compa, train_compa
    from pipeline.models.evaluate import evaluate_compa

    trained = train_compa(
        CompaConfig(backbone_weights=str(WEIGHTS), prototypes=2), [tiny], tmp_path, version="t1"
    )
    report = evaluate_compa(trained.folder, tiny)
    assert report["accuracy"] >= 0.95
    model = load_compa(trained.folder)
    noise = [np.random.default_rng(0).random((128, 128)).astype(np.float32)]
    prediction = model.predict(noise)[0]
    assert abs(sum(prediction.scores.values()) - 1.0) < 1e-6
    assert prediction.modality == "other"
    json.dumps(report)  # machine-readable
