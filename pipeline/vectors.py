"""Unit vectors: the embeddings the models give and the gallery compares by cosine."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def l2_normalise(vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
