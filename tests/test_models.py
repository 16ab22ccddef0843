"""The model toolkit: training beats the raw-pixel baseline, artifacts round-trip exactly,
COMPA tells modalities apart. Small data, few epochs: the models are the subject here."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.models.artifacts import list_models, read_model
from pipeline.models.reid import ReidModel
from synthetic.hospital import SynthOptions, generate
from training.baseline import raw_pixel_vectors
from training.datasets.reader import scan_modality
from training.metrics import cosine_similarity, retrieval_scores
from training.reid import ReidConfig, load_set, train_reid

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


@pytest.fixture(scope="module")
def xray_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 training patients (a closed-form projection needs a few dozen) and 15 others."""
    train, unseen = tmp_path_factory.mktemp("xray-train"), tmp_path_factory.mktemp("xray-unseen")
    generate(SynthOptions(out=train, patients=40, visits=3, seed=31, modalities=("xray",)))
    generate(SynthOptions(out=unseen, patients=15, visits=3, seed=32, modalities=("xray",)))
    return train / "xray", unseen


@pytest.fixture(scope="module")
def frozen(xray_sets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ReidConfig(
        modality="xray",
        recipe="frozen",
        size=224,  # the ImageNet-feature baseline's size: like against like
        backbone_weights=str(WEIGHTS) if WEIGHTS.is_file() else "none",
        seed=1,
    )
    result = train_reid(config, xray_sets[0], tmp_path_factory.mktemp("frozen"), version="f1")
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
    # written by the generator, so its patients are generated ones, whatever their IDs
    assert description["data"]["collections"] == {"": description["data"]["images"]}
    assert (trained / "MODEL_CARD.md").read_text().count("Trained on") == 1
    data = load_set(scan_modality(unseen / "dermoscopy", "dermoscopy")[:8], 96)
    first = ReidModel(trained).embed(data.images)
    second = ReidModel(trained).embed(data.images)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    listed = list_models(trained.parent)
    assert [m.name for m in listed] == [trained.name]


@needs_weights
def test_the_frozen_recipe_beats_raw_pixels_and_its_own_backbone_on_unseen_patients(
    frozen: Path, xray_sets: tuple[Path, Path]
) -> None:
    from training.evaluate import evaluate_reid

    report = evaluate_reid(frozen, xray_sets[1], imagenet_weights=str(WEIGHTS)).report
    baselines = report["baselines"]
    assert report["p_at_1"] > baselines["raw_pixel_cosine"]["p_at_1"] + 0.3, report
    # The projection adds to the ImageNet features it projects, on other patients.
    imagenet = baselines["imagenet_features"]
    assert report["map_at_r"] > imagenet["map_at_r"], report
    assert report["roc_auc"] > imagenet["roc_auc"], report


def test_the_frozen_recipe_round_trips_with_its_fitted_projection(
    frozen: Path, xray_sets: tuple[Path, Path]
) -> None:
    description = read_model(frozen)
    assert description["config"]["recipe"] == "frozen"
    chosen = [row for row in description["history"] if row["chosen"]]
    # The chosen dimension, capped by the rank of the centred training features.
    rank = description["data"]["train_images"] - 1
    assert len(chosen) == 1
    assert description["config"]["embedding_dim"] == min(chosen[0]["dims"], rank)
    assert "Recipe `frozen`" in (frozen / "MODEL_CARD.md").read_text()
    data = load_set(scan_modality(xray_sets[1] / "xray", "xray")[:8], 224)
    first = ReidModel(frozen).embed(data.images)
    np.testing.assert_array_equal(first, ReidModel(frozen).embed(data.images))
    assert first.shape[1] == description["config"]["embedding_dim"]
    # The stored layer is the centring and the whitening: not an identity, not zero.
    weights = np.load(frozen / "weights.npz")
    assert any(np.abs(weights[k]).sum() > 0 for k in weights.files if weights[k].ndim == 1)


@pytest.fixture(scope="module")
def pooled(xray_sets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ReidConfig(
        modality="xray",
        recipe="frozen",
        size=128,
        backbone_weights=str(WEIGHTS) if WEIGHTS.is_file() else "none",
        feature_layers=("block_10_expand_relu", "block_13_expand_relu"),
        grid=2,
        flips=("horizontal",),  # the network a served model rebuilds has the flipped pass
        fit_flips=("vertical",),  # and the whitening saw the images upside down too
        seed=1,
    )
    result = train_reid(config, xray_sets[0], tmp_path_factory.mktemp("pooled"), version="p1")
    return result.folder


@needs_weights
def test_inner_layers_pooled_on_a_grid_round_trip_and_beat_raw_pixels(
    pooled: Path, xray_sets: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from training.evaluate import evaluate_reid

    description = read_model(pooled)
    assert description["config"]["feature_layers"] == [
        "block_10_expand_relu",
        "block_13_expand_relu",
    ]
    assert description["config"]["grid"] == 2
    assert description["config"]["flips"] == ["horizontal"]
    assert description["config"]["fit_flips"] == ["vertical"]
    assert "vertical flips are fitted too" in (pooled / "MODEL_CARD.md").read_text()
    assert (
        "averaged over the image and its horizontal flip" in (pooled / "MODEL_CARD.md").read_text()
    )
    # A margin calibrated with the threshold: on the validation patients under the served
    # model, and on every training image with a sibling under a fit made without its fold.
    assert description["margin"] is not None and -1.0 < description["margin"] < 2.0
    counted = description["margin_calibrated_on"]
    train_images = description["data"]["train_images"]
    assert 0 < counted["validation_images"] <= description["data"]["validation_images"]
    assert counted["out_of_fold_training_images"] == train_images  # three visits each
    assert (
        f"{train_images:,} training images judged out of fold"
        in (pooled / "MODEL_CARD.md").read_text()
    )
    # and the thresholds for a header patient who is not enrolled, by gallery size
    strangers = description["stranger_thresholds"]
    assert strangers["gallery_sizes"][:3] == [1, 2, 5]
    assert strangers["scores"] == sorted(strangers["scores"])
    served = ReidModel(pooled).stranger_thresholds
    assert served is not None and served.at(1) == strangers["scores"][0]
    # and the margins by gallery size, from the same images judged as the service judges:
    # each patient's first image enrolled, the others compared with it
    margins = description["margins"]
    assert margins["gallery_sizes"][:3] == [1, 2, 5]
    assert margins["margins"] == sorted(margins["margins"])
    split = description["data"]
    patients = split["train_patients"] + split["validation_patients"]
    assert margins["own_scores"] == counted["validation_images"] + train_images - patients
    served_margins = ReidModel(pooled).margins
    assert served_margins is not None and served_margins.at(1) == margins["margins"][0]
    assert "by the margin for its gallery's size" in (pooled / "MODEL_CARD.md").read_text()
    data = load_set(scan_modality(xray_sets[1] / "xray", "xray")[:8], 128)
    first = ReidModel(pooled).embed(data.images)
    np.testing.assert_array_equal(first, ReidModel(pooled).embed(data.images))
    assert first.shape[1] == description["config"]["embedding_dim"]
    # No --imagenet-weights: the card's weights are found, here by their absolute path.
    monkeypatch.chdir(tmp_path)
    report = evaluate_reid(pooled, xray_sets[1]).report
    baselines = report["baselines"]
    assert isinstance(baselines["imagenet_features"], dict), baselines
    assert report["p_at_1"] > baselines["raw_pixel_cosine"]["p_at_1"] + 0.3, report


def test_a_card_names_weights_relative_to_the_checkout_it_was_trained_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.evaluate import card_backbone_weights

    checkout, shared = tmp_path / "checkout", tmp_path / "shared"
    (checkout / "models" / "reid-xray-v9").mkdir(parents=True)
    shared.mkdir()
    (shared / "w.weights.h5").write_bytes(b"weights")
    description = {"config": {"backbone_weights": "../shared/w.weights.h5"}}
    monkeypatch.chdir(tmp_path)  # not the checkout: the path as written does not resolve
    found = card_backbone_weights(checkout / "models" / "reid-xray-v9", description)
    assert Path(found).resolve() == (shared / "w.weights.h5").resolve()
    (shared / "w.weights.h5").unlink()
    assert card_backbone_weights(checkout / "models" / "reid-xray-v9", description) == "none"
    assert card_backbone_weights(checkout, {"config": {"backbone_weights": "none"}}) == "none"


def test_pooled_features_need_the_frozen_recipe_and_a_grid_that_divides_the_map() -> None:
    from pipeline.models.reid import EmbedderShape, build_features

    with pytest.raises(ValueError, match="frozen"):
        ReidConfig(modality="xray", feature_layers=("block_13_expand_relu",))
    shape = EmbedderShape(
        "xray",
        alpha=0.35,
        size=64,
        recipe="frozen",
        feature_layers=("block_6_expand_relu", "block_13_expand_relu"),
        grid=2,
    )
    model = build_features(shape, "none")
    out = np.asarray(model(np.zeros((1, 64, 64, 3), np.float32)))
    channels = [int(model.get_layer("taps").output[i].shape[-1]) for i in range(2)]
    assert out.shape == (1, sum(c * 4 for c in channels))
    one = build_features(replace(shape, feature_layers=("block_13_expand_relu",)), "none")
    assert np.asarray(one(np.zeros((2, 64, 64, 3), np.float32))).shape == (2, channels[1] * 4)
    with pytest.raises(ValueError, match="block_6_expand_relu is 8x8 at 64 px: not divisible"):
        build_features(replace(shape, grid=3), "none")
    with pytest.raises(ValueError, match="no layer"):
        build_features(replace(shape, feature_layers=("block_99",)), "none")


def test_features_averaged_over_flips_are_the_same_for_a_flipped_image() -> None:
    from pipeline.models.backbone import build_backbone
    from pipeline.models.reid import EmbedderShape, Flip, build_features

    with pytest.raises(ValueError, match="frozen"):
        ReidConfig(modality="dermoscopy", flips=("horizontal",))
    with pytest.raises(ValueError, match="unknown flips sideways; choose from horizontal"):
        ReidConfig(modality="dermoscopy", recipe="frozen", flips=("sideways",))
    with pytest.raises(ValueError, match="unknown flips diagonal"):
        ReidConfig(modality="dermoscopy", recipe="frozen", fit_flips=("diagonal",))
    with pytest.raises(ValueError, match="fitted on them, need --recipe frozen"):
        ReidConfig(modality="dermoscopy", fit_flips=("vertical",))
    shape = EmbedderShape(
        "dermoscopy",
        alpha=0.35,
        size=64,
        recipe="frozen",
        feature_layers=("block_6_expand_relu", "block_13_expand_relu"),
        grid=2,
    )
    image = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    mirrored, upside_down = image[:, :, ::-1], image[:, ::-1]
    backbone = build_backbone("mobilenet_v2", 0.35, 64, "none")  # one for all: same weights
    plain = build_features(shape, "none", backbone)
    # the backbone's features of a mirrored picture are not those of the picture...
    assert not np.allclose(plain(image), plain(mirrored), atol=1e-3)
    # ...their mean over the picture and its mirror is the same for both
    across = build_features(replace(shape, flips=(Flip.HORIZONTAL,)), "none", backbone)
    np.testing.assert_allclose(across(image), across(mirrored), atol=1e-5)
    assert not np.allclose(across(image), across(upside_down), atol=1e-3)
    both = build_features(replace(shape, flips=(Flip.HORIZONTAL, Flip.VERTICAL)), "none", backbone)
    # two flips: the mean over the picture, its mirror and its upside-down copy
    views = [np.asarray(plain(v)) for v in (image, mirrored, upside_down)]
    np.testing.assert_allclose(both(image), np.mean(views, axis=0), atol=1e-5)
    # the shape a description records (a JSON list) rebuilds the same network
    assert EmbedderShape.of({"modality": "dermoscopy", "flips": ["vertical"]}).flips == (
        "vertical",
    )


def test_a_model_records_the_command_that_made_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from pipeline.models.artifacts import command_line

    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/medreid", "train", "reid", "--size", "96"])
    assert command_line() == "medreid train reid --size 96"
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="benchmarks.evaluate_models")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/src/benchmarks/evaluate_models.py", "--parts", "a b"])
    assert command_line() == "python -m benchmarks.evaluate_models --parts 'a b'"


def test_a_whitening_fitted_on_other_patients_is_appended_and_round_trips(
    trained: Path, unseen: Path, tmp_path: Path
) -> None:
    from pipeline.vectors import l2_normalise
    from training.reid import whiten_reid

    whitened = whiten_reid(trained, unseen / "dermoscopy", tmp_path, version="w1").folder
    description = read_model(whitened)
    whitening = description["whitening"]
    assert whitening["base_model"] == "reid-dermoscopy-t1" and whitening["patients"] == 10
    assert description["calibrated_on"] == "out-of-fold whitening-set"
    assert -1.0 < description["threshold"] <= 1.0
    # Its own margin, from the same folds as its threshold, not the base's.
    assert description["margin_calibrated_on"] == {
        "out_of_fold_whitening_set_images": whitening["images"]
    }
    assert description["margin"] is not None and description["margin"] != read_model(trained).get(
        "margin"
    )
    assert description["stranger_thresholds"]["gallery_sizes"][0] == 1
    assert description["margins"]["own_scores"] == whitening["images"] - whitening["patients"]
    card = (whitened / "MODEL_CARD.md").read_text()
    assert "reid-dermoscopy-t1" in card
    assert "for 1 enrolled image" in card and "for 1 enrolled images" not in card

    data = load_set(scan_modality(unseen / "dermoscopy", "dermoscopy")[:8], 96)
    base = l2_normalise(ReidModel(trained).embed(data.images))
    got = ReidModel(whitened).embed(data.images)
    np.testing.assert_array_equal(got, ReidModel(whitened).embed(data.images))
    # The model is its base followed by the stored affine whitening and a normalisation.
    stored = np.load(whitened / "weights.npz")
    matrix, bias = (stored[k].astype(np.float32) for k in sorted(stored.files)[-2:])
    assert matrix.shape == (base.shape[1], description["config"]["whitening_dim"])
    np.testing.assert_allclose(got, l2_normalise(base @ matrix + bias), atol=2e-3)

    # Whitening it again replaces its whitening: the network is the base's, not followed by two.
    again = whiten_reid(whitened, unseen / "dermoscopy", tmp_path, version="w2").folder
    refitted = read_model(again)
    assert refitted["whitening"]["base_model"] == "reid-dermoscopy-t1"
    assert refitted["whitening"]["base_metrics"] == read_model(trained)["metrics"]
    assert refitted["whitening"]["base_command"] == read_model(trained)["command"]
    for key in ("threshold", "margin", "margins", "stranger_thresholds", "metrics"):
        assert refitted[key] == description[key], key
    again_stored = np.load(again / "weights.npz")
    assert again_stored.files == stored.files
    for key in stored.files:
        np.testing.assert_array_equal(again_stored[key], stored[key])


def test_a_fitted_projection_of_imagenet_features_is_not_whitened_again(
    frozen: Path, xray_sets: tuple[Path, Path], tmp_path: Path
) -> None:
    from training.reid import whiten_reid

    with pytest.raises(ValueError, match="not a fine-tuned network"):
        whiten_reid(frozen, xray_sets[1], tmp_path, version="w3")


def test_patient_split_is_disjoint() -> None:
    from training.reid import patient_split

    labels = [f"p{i // 3}" for i in range(30)]
    train, val = patient_split(labels, 0.2, seed=0)
    assert {labels[i] for i in train}.isdisjoint({labels[i] for i in val})
    assert len(train) + len(val) == 30 and len({labels[i] for i in val}) == 2


@needs_weights
def test_compa_tells_the_four_modalities_apart(tiny: Path, tmp_path: Path) -> None:
    from pipeline.models.compa import load_compa
    from training.compa import CompaConfig, train_compa
    from training.evaluate import evaluate_compa

    trained = train_compa(
        CompaConfig(backbone_weights=str(WEIGHTS), prototypes=2), [tiny], tmp_path, version="t1"
    )
    report = evaluate_compa(trained.folder, tiny)
    assert report["accuracy"] >= 0.95
    data = read_model(trained.folder)["data"]
    assert data["collections"] == {"": sum(data["images"].values())}  # a generated hospital
    model = load_compa(trained.folder)
    noise = [np.random.default_rng(0).random((128, 128)).astype(np.float32)]
    prediction = model.predict(noise)[0]
    assert abs(sum(prediction.scores.values()) - 1.0) < 1e-6
    assert prediction.modality == "other"
    json.dumps(report)  # machine-readable


def test_plots_without_matplotlib_name_the_extra_that_brings_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from training.evaluate import PlotsUnavailable, pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotsUnavailable, match=r"medreid\[training\]"):
        pyplot()


def test_a_model_card_names_its_data_and_a_non_commercial_licence_first() -> None:
    from training.cards import data_section

    restricted = data_section({"": 6300, "ham": 5129, "kermany": 2925})
    assert restricted.startswith("**Licence: non-commercial use only.**")
    assert "HAM10000" in restricted and "CC BY-NC 4.0" in restricted and "| 2925 |" in restricted
    free = data_section({"": 6300, "nih": 450})
    assert "non-commercial" not in free and "NIH ChestX-ray14" in free
    # the serving COMPA model was trained with HAM10000, and says so
    card = (
        Path(__file__).resolve().parents[1] / "models" / "compa-v2" / "MODEL_CARD.md"
    ).read_text()
    assert "non-commercial use only" in card and "HAM10000" in card


def test_a_card_calls_the_identities_of_lesion_collections_lesions() -> None:
    from training.cards import identities_in

    assert identities_in({"ham": 5129}) == "lesions"
    assert identities_in({"ham": 5, "": 3}) == "patients"  # mixed with generated patients
    assert identities_in({"kermany": 2925, "nih": 450}) == "patients"
    assert identities_in({}) == "patients"
