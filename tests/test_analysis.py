"""The analysis stage with fake models: routing, batching and verdicts, without TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from pipeline.analysis import Analysis, AnalysisSettings, HeaderFacts, ModelSet, analyse
from pipeline.gallery import GalleryIndex
from pipeline.verdicts import ByGallerySize, IdentityVerdict, ModalityVerdict


@dataclass
class FakePrediction:
    modality: str
    scores: dict[str, float]


class FakeCompa:
    """Calls an image by its mean: dark is CT, bright is X-ray."""

    version = "compa-fake"

    def predict(self, images: list[np.ndarray]) -> list[FakePrediction]:
        return [
            FakePrediction("ct" if float(i.mean()) < 0.5 else "xray", {"ct": 0.5, "xray": 0.5})
            for i in images
        ]


@dataclass
class FakeEmbedder:
    """Embeds an image as its first row: the test decides who looks like whom."""

    version: str
    threshold: float = 0.9
    calls: list[int] = field(default_factory=list)
    margin: float | None = None
    margins: ByGallerySize | None = None
    stranger_thresholds: ByGallerySize | None = None

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        self.calls.append(len(images))
        vectors = np.stack([i[0, :3] for i in images]).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def image(level: float, signature: tuple[float, float, float]) -> np.ndarray:
    pixels = np.full((4, 4), level, dtype=np.float32)
    pixels[0, :3] = signature
    return pixels


def test_batch_is_routed_embedded_once_per_model_and_judged() -> None:
    ct = FakeEmbedder("reid-ct-fake")
    xray = FakeEmbedder("reid-xray-fake")
    gallery = GalleryIndex(dim=3)
    gallery.add(["ALICE", "BOB"], np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    images = [
        image(0.2, (1, 0.01, 0)),  # CT that looks like Alice, filed as Alice
        image(0.2, (1, 0.02, 0)),  # CT that looks like Alice, filed as Bob: a swap
        image(0.2, (0, 0.1, 1)),  # CT of someone new, filed as Carol
        image(0.9, (1, 0, 0)),  # an X-ray tagged CT: wrong tag, routed to the X-ray model
    ]
    headers = [
        HeaderFacts("ALICE", "CT"),
        HeaderFacts("BOB", "CT"),
        HeaderFacts("CAROL", "CT"),
        HeaderFacts("ALICE", "CT"),
    ]
    analyses = analyse(
        images,
        headers,
        ModelSet(FakeCompa(), {"ct": ct, "xray": xray}),
        {"ct": gallery},
        AnalysisSettings(),
    )
    assert ct.calls == [3] and xray.calls == [1]
    assert [a.modality_verdict for a in analyses] == [ModalityVerdict.AGREE] * 3 + [
        ModalityVerdict.MISMATCH
    ]
    assert [a.routed_to for a in analyses] == ["ct", "ct", "ct", "xray"]
    verdicts = [a.identity.verdict for a in analyses if a.identity]
    assert verdicts == [
        IdentityVerdict.CONSISTENT,
        IdentityVerdict.MISMATCH,
        IdentityVerdict.NEW_PATIENT,
        IdentityVerdict.UNVERIFIABLE,  # no X-ray gallery
    ]
    assert analyses[1].identity is not None and analyses[1].identity.matched_patient == "ALICE"
    assert analyses[0].versions == {
        "compa": "compa-fake",
        "reid:ct": "reid-ct-fake",
        "reid:xray": "reid-xray-fake",
    }
    assert analyses[1].top_matches and analyses[1].top_matches[0]["patient_id"] == "ALICE"


def test_hold_policy_leaves_disagreeing_images_unrouted() -> None:
    embedder = FakeEmbedder("reid-ct-fake")
    analyses = analyse(
        [image(0.9, (1, 0, 0))],
        [HeaderFacts("A", "CT")],
        ModelSet(FakeCompa(), {"ct": embedder}),
        {},
        AnalysisSettings(on_disagreement="hold"),
    )
    assert analyses[0].routed_to is None and embedder.calls == []
    assert analyses[0].identity is not None
    assert analyses[0].identity.verdict is IdentityVerdict.UNVERIFIABLE


def test_a_model_with_a_calibrated_margin_judges_by_it() -> None:
    gallery = GalleryIndex(dim=3)
    gallery.add(["ALICE", "BOB"], np.array([[1, 0, 0], [0.607, 0.795, 0]], dtype=np.float32))
    # filed as Alice; it scores 0.87 against Alice and 0.92 against Bob (threshold 0.9)
    query = [image(0.2, (0.87, 0.493, 0))]
    headers = [HeaderFacts("ALICE", "CT")]

    def judged(margin: float | None) -> Analysis:
        models = ModelSet(FakeCompa(), {"ct": FakeEmbedder("reid-ct-fake", margin=margin)})
        return analyse(query, headers, models, {"ct": gallery}, AnalysisSettings())[0]

    # without a margin of its own, Bob above the threshold and Alice below it is a mismatch
    plain = judged(None)
    assert plain.identity is not None and plain.identity.verdict is IdentityVerdict.MISMATCH
    assert plain.margin is None
    # the model's margin 0.1 asks Bob to beat Alice by more than 0.05: no alarm, and
    # Alice's score below the threshold leaves the image unverifiable
    calibrated = judged(0.1)
    assert calibrated.identity is not None
    assert calibrated.identity.verdict is IdentityVerdict.UNVERIFIABLE
    assert calibrated.margin == 0.1
    # a margin smaller than the gap raises it
    close = judged(0.03)
    assert close.identity is not None and close.identity.verdict is IdentityVerdict.MISMATCH
    assert close.identity.matched_patient == "BOB"


def test_a_models_margins_are_read_at_the_gallerys_size() -> None:
    gallery = GalleryIndex(dim=3)
    gallery.add(["ALICE", "BOB"], np.array([[1, 0, 0], [0.607, 0.795, 0]], dtype=np.float32))
    query = [image(0.2, (0.87, 0.493, 0))]  # 0.87 against Alice, 0.92 against Bob: a gap of 0.05
    headers = [HeaderFacts("ALICE", "CT")]

    def judged(margins: ByGallerySize) -> Analysis:
        # its single margin, 0.01, would raise an alarm at any gallery size
        embedder = FakeEmbedder("reid-ct-fake", margin=0.01, margins=margins)
        models = ModelSet(FakeCompa(), {"ct": embedder})
        return analyse(query, headers, models, {"ct": gallery}, AnalysisSettings())[0]

    # at two enrolled images, a third of the way from 1 to 8 on the logarithm: 0.04
    low = judged(ByGallerySize((1, 8), (0.03, 0.06)))
    assert low.margin == pytest.approx(0.04)
    assert low.identity is not None and low.identity.verdict is IdentityVerdict.MISMATCH
    # margins that grow faster ask Bob to beat Alice by 0.06 in a gallery of two
    high = judged(ByGallerySize((1, 8), (0.03, 0.12)))
    assert high.margin == pytest.approx(0.06)
    assert high.identity is not None and high.identity.verdict is IdentityVerdict.UNVERIFIABLE
    # a negative margin (a small gallery) still asks another patient to beat the header's:
    # filed as Bob, whom it matches best, it is not called Alice's
    headers[0] = HeaderFacts("BOB", "CT")
    small = judged(ByGallerySize((1, 8), (-0.2, -0.1)))
    assert small.margin == 0.0
    assert small.identity is not None and small.identity.verdict is IdentityVerdict.CONSISTENT


def test_a_patient_not_enrolled_is_judged_against_the_best_of_the_gallerys_strangers() -> None:
    gallery = GalleryIndex(dim=3)
    gallery.add(["ALICE", "BOB"], np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    # what the best of one stranger reaches at 1%, and of a thousand: the gallery holds two
    strangers = ByGallerySize((1, 1000), (0.92, 0.98))
    at_two = strangers.at(2)
    assert 0.92 < at_two < 0.93
    looks_like_alice = image(0.2, (1, 0.33, 0))  # 0.9496 against Alice
    headers = [HeaderFacts("CAROL", "CT"), HeaderFacts("ALICE", "CT")]

    def judged(thresholds: ByGallerySize | None, picture: np.ndarray) -> list[Analysis]:
        embedder = FakeEmbedder("reid-ct-fake", stranger_thresholds=thresholds)
        models = ModelSet(FakeCompa(), {"ct": embedder})
        return analyse([picture] * 2, headers, models, {"ct": gallery}, AnalysisSettings())

    # Without them Carol, who is not enrolled, is called Alice at the per-pair threshold.
    carol, alice = judged(None, looks_like_alice)
    assert carol.identity is not None and carol.identity.verdict is IdentityVerdict.MISMATCH
    # With them 0.9496 beats what the best of two strangers reaches (about 0.92) too...
    carol, alice = judged(strangers, looks_like_alice)
    assert carol.identity is not None and carol.identity.verdict is IdentityVerdict.MISMATCH
    assert carol.threshold == pytest.approx(at_two)
    # ...and an enrolled header patient keeps the per-pair threshold.
    assert alice.threshold == 0.9
    assert alice.identity is not None and alice.identity.verdict is IdentityVerdict.CONSISTENT
    # A gallery whose strangers reach more: Carol is a new patient, not Alice's image.
    carol, _ = judged(ByGallerySize((1, 1000), (0.96, 0.99)), looks_like_alice)
    assert carol.identity is not None and carol.identity.verdict is IdentityVerdict.NEW_PATIENT
