"""Which models serve, loaded once per worker, and the galleries kept in step with the
database (so several worker processes see every enrollment)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis import (
    Analysis,
    AnalysisSettings,
    Embedder,
    HeaderFacts,
    ModalityClassifier,
    ModelSet,
    analyse,
)
from pipeline.gallery import GalleryIndex
from pipeline.models.artifacts import training_collections
from pipeline.ports import ModelRegistry, ModelRegistryView
from pipeline.records import FloatImage, Modality

log = logging.getLogger(__name__)
MODALITIES = tuple(str(m) for m in Modality)


def slot_of(description: dict[str, Any]) -> str:
    return "compa" if description["kind"] == "compa" else f"reid:{description['modality']}"


def discover(models_dir: Path) -> dict[str, Path]:
    """The newest model folder per slot (by creation time) under ``models_dir``."""
    newest: dict[str, tuple[str, Path]] = {}
    if not models_dir.is_dir():
        return {}
    for folder in sorted(models_dir.iterdir()):
        described = folder / "model.json"
        if not described.is_file():
            continue
        description = json.loads(described.read_text())
        slot = slot_of(description)
        created = str(description.get("created", ""))
        if slot not in newest or created > newest[slot][0]:
            newest[slot] = (created, folder)
    return {slot: folder for slot, (_, folder) in newest.items()}


def fitted_on_real_images(description: dict[str, Any]) -> bool:
    """A re-identification model fitted, network or whitening, on real images (a public
    collection's or a hospital's own), not on generated patients alone."""
    collections = training_collections(description)
    return description.get("kind") == "reid" and any(name for name in collections)


def generated_image_models(models_dir: Path, out: Path) -> Path:
    """``out`` filled with links to the models of ``models_dir`` save the re-identification
    models fitted on real images: the set that judges a generated hospital (the demo, the
    end-to-end tests), since a model fitted on real patients is not made for generated ones."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(models_dir.iterdir()):
        described = folder / "model.json"
        if not described.is_file() or fitted_on_real_images(json.loads(described.read_text())):
            continue
        link = out / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve())
    return out


def resolve(
    models_dir: Path,
    active: dict[str, tuple[str, str]],
    discovered: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """Activated models where a slot has one, else the newest."""
    chosen = dict(discover(models_dir) if discovered is None else discovered)
    for slot, (_version, path) in active.items():
        chosen[slot] = Path(path)
    return chosen


def load_model(slot: str, folder: Path) -> Any:
    if slot == "compa":
        from pipeline.models.compa import load_compa

        return load_compa(folder)
    from pipeline.models.reid import ReidModel

    return ReidModel(folder)


def embedding_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


class Analyser:
    """Models and galleries for one worker process."""

    def __init__(
        self,
        registry: ModelRegistry,
        models_dir: Path,
        settings: AnalysisSettings,
        identity_modalities: frozenset[str] = frozenset(MODALITIES),
    ) -> None:
        self.registry = registry
        self.models_dir = models_dir
        self.settings = settings
        # the modalities whose re-identification models serve; the others are not loaded, so
        # their images keep COMPA's check, are unverifiable for identity and fetch no priors
        self.identity_modalities = identity_modalities
        self.loaded: dict[str, Path] = {}
        self.models = ModelSet(compa=None)
        self.galleries: dict[str, GalleryIndex] = {}
        self._gallery_versions: dict[str, str] = {}
        self._last_id: dict[str, int] = {}
        self._discovered: tuple[int, dict[str, Path]] | None = None

    def _newest(self) -> dict[str, Path]:
        """The models folder's newest models, read again only when the folder changes."""
        stamp = self.models_dir.stat().st_mtime_ns if self.models_dir.is_dir() else 0
        if self._discovered is None or self._discovered[0] != stamp:
            self._discovered = (stamp, discover(self.models_dir))
        return self._discovered[1]

    def refresh(self) -> None:
        """Pick up an activated model and new enrollments (cheap when nothing changed)."""
        with self.registry.view() as view:
            wanted = resolve(self.models_dir, view.active_models(), self._newest())
            for slot, folder in wanted.items():
                if slot != "compa" and slot.split(":", 1)[1] not in self.identity_modalities:
                    continue
                if self.loaded.get(slot) != folder:
                    model = load_model(slot, folder)
                    if slot == "compa":
                        self.models.compa = model  # a ModalityClassifier
                    else:
                        self.models.reid[slot.split(":", 1)[1]] = model
                    self.loaded[slot] = folder
                    log.info("model %s: %s", slot, model.version)
            for modality, embedder in self.models.reid.items():
                self._sync_gallery(view, modality, embedder)

    def _sync_gallery(self, view: ModelRegistryView, modality: str, embedder: Embedder) -> None:
        if self._gallery_versions.get(modality) != embedder.version:
            self.galleries.pop(modality, None)
            self._last_id[modality] = 0
            self._gallery_versions[modality] = embedder.version
        rows = view.gallery_after(model_version=embedder.version, after_id=self._last_id[modality])
        if not rows:
            return
        vectors = np.stack([np.frombuffer(blob, dtype="<f4") for _, _, blob in rows])
        index = self.galleries.get(modality)
        if index is None:
            index = self.galleries[modality] = GalleryIndex(dim=vectors.shape[1])
        index.add([patient for _, patient, _ in rows], vectors.astype(np.float32))
        self._last_id[modality] = rows[-1][0]

    def embedder(self, modality: str) -> Embedder | None:
        """The re-identification model serving ``modality`` (after ``refresh``)."""
        return self.models.reid.get(modality)

    def analyse(self, images: list[FloatImage], headers: list[HeaderFacts]) -> list[Analysis]:
        return analyse(images, headers, self.models, self.galleries, self.settings)


__all__ = ["Analyser", "Embedder", "ModalityClassifier", "discover", "embedding_bytes"]
