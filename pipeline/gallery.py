"""The in-memory gallery index: enrolled embeddings of one modality, cosine top-k search."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.verdicts import Match


@dataclass
class GalleryIndex:
    """Unit-length embeddings in one contiguous matrix; patients as integer codes."""

    dim: int
    vectors: npt.NDArray[np.float32] = field(init=False)
    codes: npt.NDArray[np.int64] = field(init=False)
    patients: list[str] = field(default_factory=list)
    _patient_code: dict[str, int] = field(default_factory=dict)
    _size: int = 0

    def __post_init__(self) -> None:
        self.vectors = np.zeros((1024, self.dim), dtype=np.float32)
        self.codes = np.zeros(1024, dtype=np.int64)

    def __len__(self) -> int:
        return self._size

    def add(self, patient_ids: list[str], embeddings: npt.NDArray[np.float32]) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) embeddings, got {embeddings.shape}")
        needed = self._size + len(embeddings)
        if needed > len(self.vectors):
            capacity = max(needed, 2 * len(self.vectors))
            self.vectors = np.resize(self.vectors, (capacity, self.dim))
            self.codes = np.resize(self.codes, capacity)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self.vectors[self._size : needed] = embeddings / np.maximum(norms, 1e-12)
        for row, patient in enumerate(patient_ids, start=self._size):
            code = self._patient_code.setdefault(patient, len(self.patients))
            if code == len(self.patients):
                self.patients.append(patient)
            self.codes[row] = code
        self._size = needed

    def is_enrolled(self, patient_id: str | None) -> bool:
        return patient_id is not None and patient_id in self._patient_code

    def search(self, query: npt.NDArray[np.float32], k: int = 5) -> list[Match]:
        """The k best patients (one entry each: their best-scoring embedding), best first."""
        if self._size == 0:
            return []
        unit = query / max(float(np.linalg.norm(query)), 1e-12)
        scores = self.vectors[: self._size] @ unit.astype(np.float32)
        # Take enough candidates that k distinct patients are almost surely among them.
        take = min(self._size, max(k * 8, 64))
        candidates = np.argpartition(-scores, take - 1)[:take]
        candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
        best: dict[int, float] = {}
        for row in candidates:
            code = int(self.codes[row])
            if code not in best:
                best[code] = float(scores[row])
                if len(best) == k:
                    break
        return [Match(self.patients[c], s) for c, s in best.items()]

    def patient_score(self, query: npt.NDArray[np.float32], patient_id: str) -> float | None:
        """The best score of the query against one patient's enrolled embeddings."""
        code = self._patient_code.get(patient_id)
        if code is None:
            return None
        rows = np.nonzero(self.codes[: self._size] == code)[0]
        unit = query / max(float(np.linalg.norm(query)), 1e-12)
        return float((self.vectors[rows] @ unit.astype(np.float32)).max())
