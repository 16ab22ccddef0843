"""Evaluation of re-identification and COMPA models, side by side with simple baselines on the
same images in the same run; JSON for machines, a table and PNG plots for people."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.models.backbone import Preprocessing, build_backbone
from pipeline.models.compa import KNOWN, OTHER, load_compa
from pipeline.models.reid import ReidModel, embed_images
from pipeline.runner import PipelineConfig
from training.baseline import raw_pixel_vectors
from training.datasets.reader import scan, scan_modality
from training.metrics import (
    cosine_similarity,
    pair_scores,
    retrieval_scores,
    roc_curve,
    verification_scores,
)
from training.reid import load_set


def reid_scores(embeddings: npt.NDArray[np.float32], labels: list[str]) -> dict[str, float]:
    similarity = cosine_similarity(embeddings)
    retrieval = retrieval_scores(similarity, labels)
    verification = verification_scores(similarity, labels)
    return {
        "p_at_1": round(retrieval.p_at_1, 4),
        "map_at_r": round(retrieval.map_at_r, 4),
        "roc_auc": round(verification.roc_auc, 4),
        "eer": round(verification.eer, 4),
        "n_patients": len(set(labels)),
        "n_images": len(labels),
    }


def cmc(similarity: npt.NDArray[np.float32], labels: list[str], ranks: int = 20) -> list[float]:
    """Cumulative match characteristic: share of queries with a match within rank k."""
    sim = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(sim, -np.inf)
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    firsts = []
    for i in range(len(labels)):
        relevant = codes == codes[i]
        relevant[i] = False
        if not relevant.any():
            continue
        order = np.argsort(-sim[i], kind="stable")
        firsts.append(int(np.argmax(relevant[order])))
    hits = np.array(firsts)
    return [float((hits < k).mean()) for k in range(1, ranks + 1)]


@dataclass
class ReidEvaluation:
    report: dict[str, Any]
    curves: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[float]]]


def card_backbone_weights(model_dir: Path, description: dict[str, Any]) -> str:
    """The ImageNet weights a model's card names, found on this machine: as written, else
    relative to the checkout the model was trained in (a model folder lies in ``models/``, and
    the Makefile names the weights relative to the checkout), else ``none``."""
    named = str(description.get("config", {}).get("backbone_weights", "none"))
    if named in ("none", "", "imagenet") or Path(named).is_file():
        return named
    beside = model_dir.resolve().parent.parent / named
    return str(beside) if not Path(named).is_absolute() and beside.is_file() else "none"


def evaluate_reid(
    model_dir: Path,
    dataset: Path,
    *,
    pipeline: PipelineConfig | None = None,
    imagenet_weights: str | None = None,
    max_per_patient: int | None = None,
) -> ReidEvaluation:
    """Leave-one-out retrieval and all-pairs verification of the model and two baselines:
    raw-pixel cosine (64 x 64) and untrained-head ImageNet features (the model's backbone at
    ImageNet initialisation, global average pooled, centred on the set)."""
    model = ReidModel(model_dir)
    modality = model.config.modality
    folder = dataset / modality if (dataset / modality).is_dir() else dataset
    items = scan_modality(folder, modality)
    if max_per_patient:
        kept, seen = [], dict[str, int]()
        for item in items:
            seen[item.patient_id] = seen.get(item.patient_id, 0) + 1
            if seen[item.patient_id] <= max_per_patient:
                kept.append(item)
        items = kept
    data = load_set(items, max(model.config.size, 64), pipeline)
    labels = data.labels
    embeddings = model.embed(data.images)
    raw = raw_pixel_vectors(data.images, 64)
    candidates = {"model": embeddings, "raw_pixel_cosine": raw}
    weights = imagenet_weights or card_backbone_weights(model_dir, model.description)
    if weights not in ("none", "") and (weights == "imagenet" or Path(weights).is_file()):
        size = max(model.config.size, 224)
        backbone = build_backbone(model.config.backbone, model.config.alpha, size, weights)
        prep = Preprocessing.for_backbone(model.config.backbone, size)
        features = embed_images(backbone, data.images, prep)
        candidates["imagenet_features"] = features - features.mean(axis=0)
    report: dict[str, Any] = {
        "model": model.version,
        "modality": modality,
        "dataset": str(folder),
        "threshold": model.threshold,
    }
    curves = {}
    for name, vectors in candidates.items():
        scores = reid_scores(vectors, labels)
        similarity = cosine_similarity(vectors)
        pairs, genuine = pair_scores(similarity, labels)
        fpr, tpr, _ = roc_curve(pairs, genuine)
        curves[name] = (fpr, tpr, cmc(similarity, labels))
        if name == "model":
            report.update(scores)
            match = pairs >= model.threshold
            report["true_match_rate_at_threshold"] = round(float(match[genuine].mean()), 4)
            report["false_match_rate_at_threshold"] = round(float(match[~genuine].mean()), 4)
        else:
            report.setdefault("baselines", {})[name] = scores
    if "imagenet_features" not in candidates:
        named = model.description["config"].get("backbone_weights", "none")
        report.setdefault("baselines", {})["imagenet_features"] = (
            "not computed: give --imagenet-weights PATH"
            if named in ("none", "")
            else f"not computed: the model's backbone weights {named} are not on this machine; "
            "give --imagenet-weights PATH"
        )
    return ReidEvaluation(report, curves)


def evaluate_compa(
    model_dir: Path, dataset: Path, *, pipeline: PipelineConfig | None = None
) -> dict[str, Any]:
    """Accuracy, per-class recall and the confusion matrix (rows: truth, columns: prediction).
    A dataset folder called `other` holds images that should be called other."""
    model = load_compa(model_dir)
    items = [i for i in scan(dataset) if i.modality in (*KNOWN, OTHER)]
    data = load_set(items, 128, pipeline)
    predictions = model.predict(data.images) if data.images else []
    labels = (*KNOWN, OTHER)
    index = {label: n for n, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for item, prediction in zip(data.items, predictions, strict=True):
        matrix[index[item.modality], index[prediction.modality]] += 1
    present = [n for n in range(len(labels)) if matrix[n].sum()]
    recall = {labels[n]: round(float(matrix[n, n] / matrix[n].sum()), 4) for n in present}
    return {
        "model": model.version,
        "dataset": str(dataset),
        "accuracy": round(float(np.trace(matrix) / max(matrix.sum(), 1)), 4),
        "n_images": int(matrix.sum()),
        "per_class_recall": recall,
        "labels": list(labels),
        "confusion_matrix": matrix.tolist(),
        "skipped": [f"{p.name}: {r}" for p, r in data.skipped],
    }


# --------------------------------------------------------------------------- plots


class PlotsUnavailable(RuntimeError):
    """matplotlib, which only the plots need, is not installed."""


def pyplot() -> Any:
    """matplotlib's pyplot drawing off-screen; it comes with the `training` extra."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'medreid[training]' (make install has it)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def plot_reid(evaluation: ReidEvaluation, folder: Path) -> list[Path]:
    plt = pyplot()

    folder.mkdir(parents=True, exist_ok=True)
    title = f"{evaluation.report['model']} on {evaluation.report['n_patients']} patients"
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr, _) in evaluation.curves.items():
        auc = (
            evaluation.report["roc_auc"]
            if name == "model"
            else evaluation.report["baselines"][name]["roc_auc"]
        )
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false-match rate", ylabel="true-match rate", title=f"ROC, {title}")
    ax.legend(loc="lower right")
    written.append(folder / "roc.png")
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (_, _, curve) in evaluation.curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=name)
    ax.set(xlabel="rank", ylabel="share of queries matched", ylim=(0, 1.02), title=f"CMC, {title}")
    ax.legend(loc="lower right")
    written.append(folder / "cmc.png")
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return written


def plot_confusion(report: dict[str, Any], folder: Path) -> Path:
    plt = pyplot()

    folder.mkdir(parents=True, exist_ok=True)
    matrix = np.array(report["confusion_matrix"])
    labels = report["labels"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    for (r, c), value in np.ndenumerate(matrix):
        ax.text(
            c,
            r,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
        )
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"COMPA accuracy {report['accuracy']:.4f} ({report['n_images']} images)",
    )
    path = folder / "confusion.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
