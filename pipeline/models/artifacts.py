"""Model artifacts: versioned folders with weights, parameters, threshold, metrics and a card.

<kind>-<modality>-<version>/
    model.json      what it is, how to feed it, its threshold and metrics, how it was made
    weights.npz     the network's weights (float16; the measured figures are of these)
    MODEL_CARD.md   the same for people
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
CARD_FILE = "MODEL_CARD.md"


class ArtifactError(ValueError):
    """A model folder is missing or incomplete; the message names what."""


def new_version() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def model_name(description: dict[str, Any]) -> str:
    """The name a model goes by, and its folder's: ``compa-v1``, ``reid-xray-v2``."""
    if description["kind"] == "compa":
        return f"compa-{description['version']}"
    return f"reid-{description['modality']}-{description['version']}"


def command_line() -> str:
    """The command that made the model, as one would type it again."""
    program = Path(sys.argv[0]).name
    head = ["medreid"]
    if program and program != "medreid":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        head = ["python", "-m", spec.name] if spec is not None else ["python", program]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def environment() -> dict[str, str]:
    versions = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("numpy", "keras", "tensorflow", "cv2", "pydicom"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


def quantise(weights: list[npt.NDArray[Any]]) -> list[npt.NDArray[np.float32]]:
    """Round weights to float16 and back: what is saved is exactly what is measured."""
    return [np.asarray(w, np.float16).astype(np.float32) for w in weights]


def save_weights(folder: Path, weights: list[npt.NDArray[Any]]) -> None:
    arrays = {f"w{i:04d}": np.asarray(w, np.float16) for i, w in enumerate(weights)}
    np.savez_compressed(folder / WEIGHTS_FILE, **arrays)  # type: ignore[arg-type]


def load_weights(folder: Path) -> list[npt.NDArray[np.float32]]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {WEIGHTS_FILE}")
    with np.load(path) as data:
        return [data[key].astype(np.float32) for key in sorted(data.files)]


def write_model(folder: Path, description: dict[str, Any], card: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_text(json.dumps(description, indent=2, default=_plain) + "\n")
    (folder / CARD_FILE).write_text(card)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def read_model(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a model folder (no {MODEL_FILE})")
    description: dict[str, Any] = json.loads(path.read_text())
    return description


@dataclass(frozen=True)
class ModelSummary:
    folder: Path
    name: str
    kind: str
    modality: str
    version: str
    created: str
    size_mb: float
    headline: str
    trained_on: str  # the collections of its card: "generated", "own", "kermany, nih", ...


def training_collections(description: dict[str, Any]) -> dict[str, int]:
    """Images per collection of all that was fitted into a model: its network's data and, for
    a whitened model, the whitening set ("" a generated patient's, "own" a hospital's)."""
    merged = dict((description.get("data") or {}).get("collections") or {})
    for name, images in ((description.get("whitening") or {}).get("collections") or {}).items():
        merged[name] = merged.get(name, 0) + images
    return dict(sorted(merged.items()))


def trained_on(description: dict[str, Any]) -> str:
    """The collections whose images trained a model, as its card names them ("generated" for
    the generated hospital's, "own" for a hospital's own); "-" where the card names none."""
    return ", ".join(name or "generated" for name in training_collections(description)) or "-"


def list_models(root: Path) -> list[ModelSummary]:
    """Every model folder under ``root`` (one level), newest first within a kind."""
    summaries = []
    if not root.is_dir():
        return []
    for folder in sorted(p for p in root.iterdir() if (p / MODEL_FILE).is_file()):
        d = read_model(folder)
        metrics = d.get("metrics", {})
        if d["kind"] == "reid":
            headline = (
                f"val P@1 {metrics.get('p_at_1', float('nan')):.3f}, "
                f"AUC {metrics.get('roc_auc', float('nan')):.3f}, "
                f"threshold {d.get('threshold', float('nan')):.3f}"
            )
        else:
            headline = f"val accuracy {metrics.get('accuracy', float('nan')):.4f}"
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6
        summaries.append(
            ModelSummary(
                folder,
                folder.name,
                d["kind"],
                d.get("modality", "-"),
                d["version"],
                d.get("created", ""),
                round(size, 2),
                headline,
                trained_on(d),
            )
        )
    return summaries
