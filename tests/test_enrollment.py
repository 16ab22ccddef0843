"""Carrying a gallery over to a new model version: the identities of the old version's entries
are enrolled again, from their images, under the model now serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from medreid.enrollment import enroll_again, enroll_folder
from medreid.settings import load_settings
from pipeline.modelstore import load_model
from pipeline.runner import PipelineConfig
from storage.models import AuditEvent, GalleryEntry
from synthetic.hospital import SynthOptions, generate
from tests.conftest import Database
from training.datasets.reader import iter_images, scan_modality

MODELS = Path(__file__).resolve().parents[1] / "models"
NEW = "reid-xray-v2"


def old_copy(of: Path, into: Path) -> Path:
    """The serving model's network under an older version label, as a release before it."""
    folder = into / "reid-xray-v0"
    shutil.copytree(of, folder)
    described = json.loads((folder / "model.json").read_text())
    described.update(version="v0", created="2020-01-01T00:00:00+00:00")
    (folder / "model.json").write_text(json.dumps(described))
    return folder


def test_a_gallery_moves_to_the_new_model_version(
    sqlite_database: Database, tmp_path: Path
) -> None:
    hospital = tmp_path / "hospital"
    generate(SynthOptions(out=hospital, patients=4, visits=2, seed=41, modalities=("xray",)))
    models = tmp_path / "models"
    models.mkdir()
    old_copy(MODELS / NEW, models)
    settings = load_settings(
        env={
            "MEDREID_DATABASE_URL": sqlite_database.url,
            "MEDREID_MODELS_DIR": str(models),
            "MEDREID_SPOOL_DIR": str(tmp_path / "spool"),
        }
    )
    sessions = sqlite_database.sessions
    assert enroll_folder(settings, sessions, hospital, "tester") == {"reid-xray-v0": 8}
    # One enrolled image has since been deleted.
    lost = sorted((hospital / "xray").rglob("*.dcm"))[0]
    lost.unlink()

    # The new release is filled before it serves: v0 still serves here.
    counts, gone = enroll_again(
        settings, sessions, "tester", from_model="reid-xray-v0", into=MODELS / NEW
    )
    assert counts == {NEW: 7} and gone == 1

    with sessions.begin() as session:
        entries = session.scalars(
            select(GalleryEntry).where(GalleryEntry.model_version == NEW)
        ).all()
        patients = sorted(e.patient_id for e in entries)
        moved = {Path(e.source_path or ""): np.frombuffer(e.embedding, np.float32) for e in entries}
        enrollments = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.event_type == "Gallery Enrollment")
        )
    expected = sorted(i.patient_id for i in scan_modality(hospital / "xray", "xray"))
    assert patients == expected and lost not in moved
    # The embeddings are the new model's own, of the same images.
    model = load_model("reid:xray", MODELS / NEW)
    items = scan_modality(hospital / "xray", "xray")
    images = [image for _, image, _ in iter_images(items, PipelineConfig())]
    direct = model.embed(images)
    for item, vector in zip(items, direct, strict=True):
        np.testing.assert_allclose(moved[item.path], vector, atol=1e-6)
    assert enrollments == 2  # the first enrollment and the move

    (models / NEW).symlink_to(MODELS / NEW)  # now the newest: it serves
    with pytest.raises(ValueError, match="is the model enrolling xray"):
        enroll_again(settings, sessions, "tester", from_model=NEW)
    with pytest.raises(ValueError, match="no entries of reid-xray-v7"):
        enroll_again(settings, sessions, "tester", from_model="reid-xray-v7")
