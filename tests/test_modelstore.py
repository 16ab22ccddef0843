"""Model selection, activation without restart, and gallery sync across processes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from medreid.registry import SqlModelRegistry
from pipeline import modelstore
from pipeline.analysis import AnalysisSettings, HeaderFacts
from pipeline.modelstore import Analyser, discover, embedding_bytes
from pipeline.verdicts import IdentityVerdict, ModalityVerdict
from storage.gallery import NewGalleryEntry, activate_model, add_gallery_entries
from tests.conftest import Database

pytestmark = pytest.mark.db


class FakeReid:
    threshold = 0.9
    margin = None
    margins = None
    stranger_thresholds = None

    def __init__(self, folder: Path) -> None:
        self.version = folder.name

    def embed(self, images: list[Any]) -> np.ndarray:
        return np.ones((len(images), 2), dtype=np.float32)


def gallery_entry(patient: str, version: str, vector: list[float]) -> NewGalleryEntry:
    return NewGalleryEntry(
        patient, "xray", version, embedding_bytes(np.array(vector)), None, None, "admin"
    )


def model_folder(root: Path, name: str, created: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(
        json.dumps({"kind": "reid", "modality": "xray", "version": name, "created": created})
    )
    return folder


def test_activation_and_enrollment_reach_a_running_worker(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def fake_load(slot: str, folder: Path) -> FakeReid:
        loads.append(folder.name)
        return FakeReid(folder)

    monkeypatch.setattr(modelstore, "load_model", fake_load)
    old = model_folder(tmp_path, "reid-xray-v1", "2026-01-01T00:00:00+00:00")
    model_folder(tmp_path, "reid-xray-v2", "2026-02-01T00:00:00+00:00")
    assert discover(tmp_path) == {"reid:xray": tmp_path / "reid-xray-v2"}

    analyser = Analyser(SqlModelRegistry(database.sessions), tmp_path, AnalysisSettings())
    analyser.refresh()
    assert analyser.models.versions() == {"reid:xray": "reid-xray-v2"}
    analyser.refresh()
    assert loads == ["reid-xray-v2"]  # loaded once, not per batch

    # Another process activates the older version and enrolls a patient for it.
    with database.sessions.begin() as session:
        activate_model(session, slot="reid:xray", version=old.name, path=str(old), by="admin")
        add_gallery_entries(
            session,
            entries=[
                gallery_entry("P1", "reid-xray-v1", [1.0, 0.0]),
                gallery_entry("P2", "reid-xray-v2", [0.0, 1.0]),
            ],
        )
    analyser.refresh()
    assert analyser.models.versions() == {"reid:xray": "reid-xray-v1"}
    assert loads == ["reid-xray-v2", "reid-xray-v1"]
    gallery = analyser.galleries["xray"]
    assert len(gallery) == 1 and gallery.is_enrolled("P1") and not gallery.is_enrolled("P2")
    with database.sessions.begin() as session:
        add_gallery_entries(
            session,
            entries=[
                gallery_entry("P3", "reid-xray-v1", [0.6, 0.8]),
            ],
        )
    analyser.refresh()
    assert len(analyser.galleries["xray"]) == 2
    assert analyser.embedder("xray") is analyser.models.reid["xray"]


class FakeCompa:
    """Calls every image an X-ray."""

    version = "compa-fake"

    def predict(self, images: list[Any]) -> list[Any]:
        return [SimpleNamespace(modality="xray", scores={"xray": 1.0}) for _ in images]


def test_a_modality_left_out_of_identity_serves_no_model_and_keeps_its_modality_check(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def fake_load(slot: str, folder: Path) -> Any:
        loads.append(slot)
        return FakeCompa() if slot == "compa" else FakeReid(folder)

    monkeypatch.setattr(modelstore, "load_model", fake_load)
    model_folder(tmp_path, "reid-xray-v1", "2026-01-01T00:00:00+00:00")
    (tmp_path / "compa-v1").mkdir()
    (tmp_path / "compa-v1" / "model.json").write_text(
        json.dumps({"kind": "compa", "version": "v1", "created": "2026-01-01T00:00:00+00:00"})
    )
    with database.sessions.begin() as session:
        add_gallery_entries(
            session,
            entries=[gallery_entry("ALICE", "reid-xray-v1", [1.0, 0.0])],
        )
    analyser = Analyser(
        SqlModelRegistry(database.sessions),
        tmp_path,
        AnalysisSettings(),
        identity_modalities=frozenset({"ct"}),
    )
    analyser.refresh()
    # the X-ray model is not loaded: no gallery, no priors fetched for it, no verdict by it
    assert loads == ["compa"] and analyser.models.versions() == {"compa": "compa-fake"}
    assert analyser.embedder("xray") is None and "xray" not in analyser.galleries
    # an X-ray of Alice tagged CT: its tag is still checked, its identity is not judged
    [result] = analyser.analyse([np.full((4, 4), 0.9, np.float32)], [HeaderFacts("BOB", "CT")])
    assert result.modality_verdict is ModalityVerdict.MISMATCH and result.routed_to == "xray"
    assert result.identity is not None
    assert result.identity.verdict is IdentityVerdict.UNVERIFIABLE
    assert result.embedding is None and result.top_matches is None


def test_generated_hospitals_get_the_models_not_fitted_on_real_images(tmp_path: Path) -> None:
    from pipeline.modelstore import generated_image_models

    models = tmp_path / "models"
    model_folder(models, "reid-xray-v2", "2026-01-01T00:00:00+00:00")
    real = model_folder(models, "reid-xray-v3", "2026-02-01T00:00:00+00:00")
    described = json.loads((real / "model.json").read_text())
    described["data"] = {"collections": {"kermany": 10, "nih": 4}}
    (real / "model.json").write_text(json.dumps(described))
    compa = models / "compa-v2"
    compa.mkdir()
    (compa / "model.json").write_text(
        json.dumps({"kind": "compa", "created": "2026-02-01", "data": {"collections": {"ham": 1}}})
    )
    assert discover(models)["reid:xray"] == real
    chosen = generated_image_models(models, tmp_path / "generated")
    assert sorted(p.name for p in chosen.iterdir()) == ["compa-v2", "reid-xray-v2"]
    assert discover(chosen)["reid:xray"].resolve() == (models / "reid-xray-v2").resolve()
    assert generated_image_models(models, tmp_path / "generated") == chosen  # again: no error
