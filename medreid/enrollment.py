"""Enrollment: embeddings of known patients into the gallery, from a dataset folder or from
instances already received."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from medreid.app import pipeline_config
from medreid.pacs import PriorImage
from medreid.settings import Settings
from pipeline.analysis import Embedder
from pipeline.models.artifacts import model_name, read_model
from pipeline.modelstore import embedding_bytes, load_model, resolve
from pipeline.records import StageError
from storage import audit
from storage.audit_trail import append_audit
from storage.gallery import NewGalleryEntry, active_models, add_gallery_entries
from storage.models import GalleryEntry, Instance
from training.datasets.reader import DatasetItem, iter_images, scan


def _embedders(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, object]:
    with sessions.begin() as session:
        wanted = resolve(settings.models.dir, active_models(session))
    return {slot.split(":", 1)[1]: folder for slot, folder in wanted.items() if slot != "compa"}


def _enroll(
    settings: Settings,
    sessions: sessionmaker[Session],
    work: dict[str, list[tuple[DatasetItem, int | None]]],
    enrolled_by: str,
    progress: Callable[[int, int], None] | None = None,
    folders: Mapping[str, object] | None = None,
) -> dict[str, int]:
    folders = _embedders(settings, sessions) if folders is None else folders
    counts: dict[str, int] = {}
    total = sum(len(v) for m, v in work.items() if m in folders)
    done = 0
    config = pipeline_config(settings)
    for modality, entries in work.items():
        if modality not in folders:
            continue
        model = load_model(f"reid:{modality}", Path(str(folders[modality])))
        for start in range(0, len(entries), 64):
            chunk = entries[start : start + 64]
            loaded = [
                (item, instance_id, image)
                for (item, instance_id), (_, image, _) in zip(
                    chunk, iter_images([c[0] for c in chunk], config), strict=True
                )
                if image is not None
            ]
            done += len(chunk)
            if progress:
                progress(done, total)
            if not loaded:
                continue
            vectors = model.embed([image for _, _, image in loaded])
            with sessions.begin() as session:
                add_gallery_entries(
                    session,
                    entries=[
                        NewGalleryEntry(
                            patient_id=item.patient_id,
                            modality=modality,
                            model_version=model.version,
                            embedding=embedding_bytes(vector),
                            source_instance_id=instance_id,
                            source_path=str(item.path),
                            enrolled_by=enrolled_by,
                        )
                        for (item, instance_id, _), vector in zip(loaded, vectors, strict=True)
                    ],
                )
                append_audit(
                    session,
                    record=audit.AuditRecord(
                        kind=audit.GALLERY_ENROLLMENT,
                        actor_user=enrolled_by,
                        detail={
                            "model": model.version,
                            "embeddings": len(loaded),
                            "patients": sorted({i.patient_id for i, _, _ in loaded})[:50],
                        },
                    ),
                )
            counts[model.version] = counts.get(model.version, 0) + len(loaded)
    return counts


def enroll_folder(
    settings: Settings,
    sessions: sessionmaker[Session],
    dataset: Path,
    enrolled_by: str,
    progress: Callable[[int, int], None] | None = None,
    *,
    files: str | None = None,
) -> dict[str, int]:
    """Every image of DATASET/<modality>/<patient_id>/, the folder giving the identity;
    only file names matching the ``files`` glob, where given (``v1_*``: first visits)."""
    work: dict[str, list[tuple[DatasetItem, int | None]]] = {}
    for item in scan(dataset):
        if files is None or fnmatch.fnmatch(item.path.name, files):
            work.setdefault(item.modality, []).append((item, None))
    if not work:
        raise ValueError(f"no images in {dataset}" + (f" named {files}" if files else ""))
    return _enroll(settings, sessions, work, enrolled_by, progress)


def enroll_received(
    settings: Settings,
    sessions: sessionmaker[Session],
    enrolled_by: str,
    *,
    study: str | None,
    patient: str | None,
) -> dict[str, int]:
    """Received instances of a study or header patient, identified by their header PatientID
    and routed by their header Modality through the tag map."""
    tag_map = settings.analysis.tag_mapping()
    spool = settings.spool.dir.resolve()
    with sessions.begin() as session:
        stmt = select(Instance)
        if study:
            stmt = stmt.where(Instance.study_instance_uid == study)
        if patient:
            stmt = stmt.where(Instance.patient_id == patient)
        instances = list(session.scalars(stmt))
    if not instances:
        raise ValueError("no received instances match")
    work: dict[str, list[tuple[DatasetItem, int | None]]] = {}
    for instance in instances:
        modality = tag_map.get((instance.modality or "").upper())
        if modality is None or not instance.patient_id:
            continue
        item = DatasetItem(spool / instance.spool_path, modality, instance.patient_id)
        work.setdefault(modality, []).append((item, instance.id))
    try:
        return _enroll(settings, sessions, work, enrolled_by)
    except StageError as exc:
        raise ValueError(exc.reason) from None


def enroll_again(
    settings: Settings,
    sessions: sessionmaker[Session],
    enrolled_by: str,
    *,
    from_model: str,
    into: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, int], int]:
    """The gallery of an earlier model version enrolled again under the model now serving each
    modality, from the images it was enrolled from: a received instance's spooled file, or the
    enrolled file where it still exists. Returns the counts and the entries whose image is gone.

    Embeddings of two model versions are not comparable, so a new version starts with an empty
    gallery; this carries the identities over without a new enrollment from the PACS. With
    ``into`` (a model folder), the entries go to that model instead, before it serves."""
    spool = settings.spool.dir.resolve()
    with sessions.begin() as session:
        rows = session.execute(
            select(GalleryEntry, Instance.spool_path)
            .outerjoin(Instance, Instance.id == GalleryEntry.source_instance_id)
            .where(GalleryEntry.model_version == from_model)
            .order_by(GalleryEntry.id)
        ).all()
    if not rows:
        raise ValueError(f"the gallery has no entries of {from_model}")
    serving = _embedders(settings, sessions)
    if into is not None:
        target = read_model(into)
        if target["kind"] != "reid":
            raise ValueError(f"{into.name} is not a re-identification model")
        serving = {target["modality"]: into}
    for modality in {entry.modality for entry, _ in rows}:
        if modality not in serving:
            raise ValueError(f"no re-identification model for {modality} to enroll into")
        if model_name(read_model(Path(str(serving[modality])))) == from_model:
            raise ValueError(f"{from_model} is the model enrolling {modality}: nothing to move")
    work: dict[str, list[tuple[DatasetItem, int | None]]] = {}
    priors: dict[tuple[str, str], list[PriorImage]] = {}
    gone = 0
    for entry, spool_path in rows:
        if entry.prior_sop_uid and entry.prior_node:
            # a PACS prior keeps its reference, not its pixels: fetched again below
            priors.setdefault((entry.patient_id, entry.modality), []).append(_prior_image(entry))
            continue
        source = spool / spool_path if spool_path else None
        if source is None and entry.source_path:
            source = Path(entry.source_path)
        if source is None or not source.is_file():
            gone += 1
            continue
        item = DatasetItem(source, entry.modality, entry.patient_id)
        work.setdefault(entry.modality, []).append((item, entry.source_instance_id))
    counts = _enroll(settings, sessions, work, enrolled_by, progress, serving)
    if priors:
        fetched, missing = _fetch_priors_again(settings, sessions, priors, serving, enrolled_by)
        for version, n in fetched.items():
            counts[version] = counts.get(version, 0) + n
        gone += missing
    return counts, gone


def _prior_image(entry: GalleryEntry) -> PriorImage:
    return PriorImage(
        node=str(entry.prior_node),
        patient_id=entry.patient_id,
        study_instance_uid=str(entry.prior_study_uid),
        study_date=entry.prior_study_date,
        series_instance_uid=str(entry.prior_series_uid),
        sop_instance_uid=str(entry.prior_sop_uid),
        modality="",
    )


class _TargetModels:
    """The models enrolled into, as the priors fetcher's embedders."""

    def __init__(self, folders: Mapping[str, object]) -> None:
        self.folders = folders
        self.loaded: dict[str, Embedder] = {}

    def refresh(self) -> None:
        pass

    def embedder(self, modality: str) -> Embedder | None:
        if modality not in self.loaded and modality in self.folders:
            folder = Path(str(self.folders[modality]))
            self.loaded[modality] = load_model(f"reid:{modality}", folder)
        return self.loaded.get(modality)


def _fetch_priors_again(
    settings: Settings,
    sessions: sessionmaker[Session],
    priors: dict[tuple[str, str], list[PriorImage]],
    folders: Mapping[str, object],
    enrolled_by: str,
) -> tuple[dict[str, int], int]:
    """PACS priors fetched again from their nodes by reference and embedded under the new
    models. Where no node is configured, they are not to be had (the service fetches a
    patient's priors again on demand)."""
    from medreid.builders import build_priors

    models = _TargetModels(folders)
    fetcher = build_priors(settings, sessions, models, enrolled_by)
    if fetcher is None:
        return {}, sum(len(images) for images in priors.values())
    counts: dict[str, int] = {}
    missing = 0
    for (patient_id, modality), images in priors.items():
        key = fetcher.key(patient_id, modality)
        if key is None:
            missing += len(images)
            continue
        kept, lost = fetcher.fetch_again(key, images)
        counts[key.model_version] = counts.get(key.model_version, 0) + kept
        missing += lost
    return counts, missing
