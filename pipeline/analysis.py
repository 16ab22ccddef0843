"""The model stages after decode and CLAHE: COMPA, the modality verdict, routing, embedding,
gallery match and the identity verdict. Models come in through small Protocols, so the
heavy libraries load only where a real model is used."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.gallery import GalleryIndex
from pipeline.records import FloatImage
from pipeline.verdicts import (
    DEFAULT_MISMATCH_MARGIN,
    DEFAULT_TAG_MAP,
    ByGallerySize,
    IdentityDecision,
    IdentityVerdict,
    ModalityVerdict,
    identity_verdict,
    modality_verdict,
    route,
)


class ModalityPrediction(Protocol):
    modality: str
    scores: dict[str, float]


class ModalityClassifier(Protocol):
    version: str

    def predict(self, images: list[FloatImage]) -> Sequence[ModalityPrediction]: ...


class Embedder(Protocol):
    version: str
    threshold: float
    # The model's own mismatch margin, calibrated on identities it never saw (None where the
    # model has none: the settings' margin and the threshold then decide together).
    margin: float | None
    # That margin by gallery size, which it needs to grow with (None where the model has
    # none: ``margin`` then decides).
    margins: ByGallerySize | None
    # The threshold for a header patient who is not enrolled, by gallery size (None where the
    # model has none: the threshold then decides).
    stranger_thresholds: ByGallerySize | None

    def embed(self, images: list[FloatImage]) -> npt.NDArray[np.float32]: ...


@dataclass
class ModelSet:
    compa: ModalityClassifier | None
    reid: dict[str, Embedder] = field(default_factory=dict)

    def versions(self) -> dict[str, str]:
        versions = {"compa": self.compa.version} if self.compa else {}
        versions.update({f"reid:{m}": e.version for m, e in self.reid.items()})
        return versions


@dataclass(frozen=True)
class AnalysisSettings:
    tag_map: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TAG_MAP))
    on_disagreement: str = "prediction"  # or "hold"
    top_k: int = 5
    mismatch_margin: float | None = DEFAULT_MISMATCH_MARGIN


@dataclass(frozen=True)
class HeaderFacts:
    patient_id: str | None
    modality: str | None


@dataclass(frozen=True)
class Analysis:
    predicted_modality: str | None
    modality_scores: dict[str, float] | None
    modality_verdict: ModalityVerdict | None
    routed_to: str | None
    top_matches: list[dict[str, Any]] | None
    identity: IdentityDecision | None
    threshold: float | None
    versions: dict[str, str]
    embedding: npt.NDArray[np.float32] | None = None  # for enrollment; not part of the result
    margin: float | None = None  # the model's calibrated margin, where it decided


def analyse(
    images: list[FloatImage],
    headers: list[HeaderFacts],
    models: ModelSet,
    galleries: Mapping[str, GalleryIndex],
    settings: AnalysisSettings,
) -> list[Analysis]:
    """Analyse a batch: one COMPA call and one embedding call per routed modality."""
    if not images:
        return []
    predictions = list(models.compa.predict(images)) if models.compa else [None] * len(images)
    verdicts: list[ModalityVerdict | None] = []
    routes: list[str | None] = []
    for prediction, header in zip(predictions, headers, strict=True):
        if prediction is None:
            verdicts.append(None)
            mapped = settings.tag_map.get((header.modality or "").strip().upper())
            routes.append(mapped)
            continue
        verdict = modality_verdict(prediction.modality, header.modality, settings.tag_map)
        verdicts.append(verdict)
        routes.append(
            route(
                prediction.modality,
                header.modality,
                verdict,
                settings.tag_map,
                on_disagreement=settings.on_disagreement,
            )
        )
    decisions: dict[int, tuple[list[dict[str, Any]], IdentityDecision, float, float | None]] = {}
    vectors: dict[int, npt.NDArray[np.float32]] = {}
    for modality in sorted({r for r in routes if r is not None}):
        embedder = models.reid.get(modality)
        if embedder is None:
            continue
        members = [i for i, r in enumerate(routes) if r == modality]
        embeddings = embedder.embed([images[i] for i in members])
        gallery = galleries.get(modality)
        # what the gallery's size asks of every image of this batch
        enrolled = len(gallery) if gallery is not None else 0
        calibrated = embedder.margin
        if embedder.margins is not None and enrolled:
            # below a few images a stranger rarely comes near, and the calibrated margin is
            # negative; the rule still asks another patient to beat the header's
            calibrated = max(0.0, embedder.margins.at(enrolled))
        strangers = (
            embedder.stranger_thresholds.at(enrolled)
            if embedder.stranger_thresholds is not None and enrolled
            else None
        )
        for i, embedding in zip(members, embeddings, strict=True):
            vectors[i] = embedding
            header_patient = headers[i].patient_id
            found = gallery.search(embedding, settings.top_k) if gallery is not None else []
            header_score = (
                gallery.patient_score(embedding, header_patient)
                if gallery is not None and header_patient
                else None
            )
            applied = embedder.threshold
            if gallery is None or not enrolled:
                # nobody of this modality is enrolled: nothing to verify against
                decision = IdentityDecision(IdentityVerdict.UNVERIFIABLE, None, None, None)
            else:
                if header_score is None and strangers is not None:
                    # no own score to compare with: another patient must beat what the best
                    # of this many strangers reaches by chance
                    applied = strangers
                decision = identity_verdict(
                    found,
                    header_patient,
                    applied,
                    header_enrolled=gallery.is_enrolled(header_patient),
                    header_score=header_score,
                    margin=settings.mismatch_margin if calibrated is None else calibrated,
                    margin_calibrated=calibrated is not None,
                )
            decisions[i] = (
                [{"patient_id": m.patient_id, "score": round(m.score, 5)} for m in found],
                decision,
                applied,
                calibrated,
            )
    versions = models.versions()
    out = []
    for i, prediction in enumerate(predictions):
        matches: list[dict[str, Any]] | None = None
        threshold: float | None = None
        margin: float | None = None
        decision = IdentityDecision(IdentityVerdict.UNVERIFIABLE, None, None, None)
        if i in decisions:
            matches, decision, threshold, margin = decisions[i]
        out.append(
            Analysis(
                predicted_modality=prediction.modality if prediction else None,
                modality_scores=dict(prediction.scores) if prediction else None,
                modality_verdict=verdicts[i],
                routed_to=routes[i],
                top_matches=matches,
                identity=decision,
                threshold=threshold,
                versions=versions,
                embedding=vectors.get(i),
                margin=margin,
            )
        )
    return out
