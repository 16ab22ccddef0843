"""Re-identification recipes on real images, under identity-disjoint cross-validation.

    python -m benchmarks.reid_cv [--real ../shared/data/real] [--imagenet PATH]
        [--sets kermany,nih,ham] [--recipes KEY,...] [--folds 5] [--out var/reid-cv]

Each set's identities are dealt into ``--folds`` folds. For each fold, the other folds'
identities are split as ``medreid train reid`` splits them: 80% fit the recipe's projection
(its dimension and shrinkage chosen by an inner cross-validation over them) and 20%, never
seen by the fit, calibrate the threshold for a 1% false-match rate. The held-out fold then
gives P@1 and mAP@R (every image a query against all others of the fold), the ROC AUC of all
its pairs, and the false- and true-match rates at that threshold: figures for identities that
neither fitted nor calibrated anything. Mean and spread across folds.

Beside the recipes, in the same run: raw-pixel cosine (32 px) and untrained ImageNet features
(MobileNetV2's global pool at 224 px), calibrated the same way. The recipe that ``make models``
ships for each set is marked. ``--recipes`` measures only the recipes with those keys (the
baselines always run).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.models.backbone import build_backbone, quiet_tensorflow
from pipeline.models.reid import EmbedderShape, Flip, build_features, embed_images, flipped
from pipeline.records import FloatImage
from training.baseline import raw_pixel_vectors
from training.datasets.reader import scan_modality
from training.metrics import (
    cosine_similarity,
    pair_scores,
    retrieval_scores,
    roc_auc,
    threshold_for_false_match_rate,
)
from training.projection import fit_within_class_whitening, patient_folds, select_projection
from training.reid import LoadedSet, load_set, patient_split

DEFAULT_IMAGENET = (
    Path("..") / "shared" / "weights" / ("mobilenet_v2_1.0_224_torchvision_imagenet.weights.h5")
)
B6, B10, B13 = "block_6_expand_relu", "block_10_expand_relu", "block_13_expand_relu"


@dataclass(frozen=True)
class Recipe:
    key: str
    name: str
    layers: tuple[str, ...]  # empty: the global pool of the last layer
    grid: int = 1
    size: int = 128
    shipped: bool = False
    flips: tuple[Flip, ...] = ()  # features averaged over the image and these flips
    fit_flips: tuple[Flip, ...] = ()  # the fit also sees these flips of its images


# The recipes compared on each set; `shipped` is what the Makefile trains.
XRAY_RECIPES = (
    Recipe("global-256", "global pool, 256 px (before)", (), size=256),
    Recipe("global", "global pool", ()),
    Recipe("b13-4", "block 13, 4x4", (B13,), 4),
    Recipe("b10-4", "block 10, 4x4", (B10,), 4),
    Recipe("b6-10-13-4", "blocks 6+10+13, 4x4", (B6, B10, B13), 4),
    Recipe(
        "b6-10-13-4-192", "blocks 6+10+13, 4x4, 192 px", (B6, B10, B13), 4, size=192, shipped=True
    ),
    Recipe("b6-10-13-6-192", "blocks 6+10+13, 6x6, 192 px", (B6, B10, B13), 6, size=192),
)
DERMOSCOPY_RECIPES = (
    Recipe("global-256", "global pool, 256 px (before)", (), size=256),
    Recipe("global", "global pool", ()),
    Recipe("b10-1", "block 10, global", (B10,), 1),
    Recipe("b13-2", "block 13, 2x2", (B13,), 2),
    Recipe("b10-13-2", "blocks 10+13, 2x2 (v4)", (B10, B13), 2),
    Recipe(
        "b10-13-2-h", "blocks 10+13, 2x2, mirrored mean", (B10, B13), 2, flips=(Flip.HORIZONTAL,)
    ),
    Recipe(
        "b10-13-2-h-v",
        "blocks 10+13, 2x2, mirrored mean, fitted upside down too",
        (B10, B13),
        2,
        shipped=True,
        flips=(Flip.HORIZONTAL,),
        fit_flips=(Flip.VERTICAL,),
    ),
    Recipe(
        "b10-13-2-h-v-160",
        "the same at 160 px",
        (B10, B13),
        2,
        size=160,
        flips=(Flip.HORIZONTAL,),
        fit_flips=(Flip.VERTICAL,),
    ),
)
SETS = {
    # name: (modality folder, identity folder prefix, recipes)
    "kermany": ("xray", "kermany_", XRAY_RECIPES),
    "nih": ("xray", "nih_", XRAY_RECIPES),
    "ham": ("dermoscopy", "ham_", DERMOSCOPY_RECIPES),
}


def _unit(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    x = np.asarray(x, np.float64)
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def cross_validate(
    features: npt.NDArray[np.floating],
    labels: list[str],
    *,
    fitted: bool,
    folds: int,
    false_match_rate: float = 0.01,
    seed: int = 0,
    also_fit: tuple[npt.NDArray[np.floating], ...] = (),
) -> dict[str, Any]:
    """Per-fold figures on held-out identities (see the module's note). ``also_fit``: other
    views of the same images, row for row, that the whitening is fitted on beside them (its
    dimension and shrinkage chosen on the images alone, as ``medreid train reid`` does)."""
    x = np.asarray(features, np.float64)
    names = np.asarray(labels)
    rows: list[dict[str, float]] = []
    for fold, held in enumerate(patient_folds(labels, folds, seed)):
        rest = np.flatnonzero(~held)
        fit_idx, cal_idx = patient_split(names[rest].tolist(), 0.2, seed + fold)
        fit, cal = rest[fit_idx], rest[cal_idx]
        chosen: dict[str, float] = {}
        embed: Callable[[npt.NDArray[np.floating]], npt.NDArray[np.float64]] = _unit
        if fitted:
            choice = select_projection(x[fit], names[fit].tolist(), seed=seed)
            projection = fit_within_class_whitening(
                np.concatenate([x[fit], *(np.asarray(v, np.float64)[fit] for v in also_fit)]),
                names[fit].tolist() * (1 + len(also_fit)),
                choice.dims,
                choice.shrinkage,
            )
            embed = projection.apply
            chosen = {"dims": choice.dims, "shrinkage": choice.shrinkage}
        cal_pairs, cal_genuine = pair_scores(cosine_similarity(embed(x[cal])), names[cal].tolist())
        threshold = threshold_for_false_match_rate(cal_pairs, cal_genuine, false_match_rate)
        similarity = cosine_similarity(embed(x[held]))
        test_labels = names[held].tolist()
        pairs, genuine = pair_scores(similarity, test_labels)
        retrieval = retrieval_scores(similarity, test_labels)
        rows.append(
            {
                "p_at_1": retrieval.p_at_1,
                "map_at_r": retrieval.map_at_r,
                "roc_auc": roc_auc(pairs, genuine),
                "false_match_rate": float((pairs[~genuine] >= threshold).mean()),
                "true_match_rate": float((pairs[genuine] >= threshold).mean()),
                "threshold": float(threshold),
                **chosen,
            }
        )
    summary: dict[str, Any] = {"folds": rows}
    for key in ("p_at_1", "map_at_r", "roc_auc", "false_match_rate", "true_match_rate"):
        values = [row[key] for row in rows]
        summary[key] = round(float(np.mean(values)), 4)
        summary[f"{key}_sd"] = round(float(np.std(values)), 4)
    return summary


def recipe_features(
    recipe: Recipe, data: LoadedSet, weights: str, images: list[FloatImage] | None = None
) -> npt.NDArray[np.float32]:
    shape = EmbedderShape(
        "benchmark",
        size=recipe.size,
        recipe="frozen",
        feature_layers=recipe.layers,
        grid=recipe.grid,
        flips=recipe.flips,
    )
    backbone = build_backbone(shape.backbone, shape.alpha, shape.size, weights)
    return embed_images(
        build_features(shape, "none", backbone),
        data.images if images is None else images,
        shape.preprocessing(),
    )


def _line(name: str, found: dict[str, Any]) -> str:
    return (
        f"  {name:32s} P@1 {found['p_at_1']:.3f} ± {found['p_at_1_sd']:.3f}   "
        f"AUC {found['roc_auc']:.4f} ± {found['roc_auc_sd']:.4f}   "
        f"FMR {found['false_match_rate']:.4f} (target 0.01)   "
        f"TMR {found['true_match_rate']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", type=Path, default=Path("..") / "shared" / "data" / "real")
    parser.add_argument("--imagenet", type=Path, default=DEFAULT_IMAGENET)
    parser.add_argument("--sets", default=",".join(SETS), help=f"from {', '.join(SETS)}")
    parser.add_argument("--recipes", default="", help="only the recipes with these keys")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("var/reid-cv"))
    args = parser.parse_args()
    chosen = args.sets.split(",")
    if set(chosen) - set(SETS):
        parser.error(f"unknown sets {sorted(set(chosen) - set(SETS))}")
    for needed in (args.real, args.imagenet):
        if not needed.exists():
            parser.error(f"{needed} does not exist: this benchmark measures real images")
    quiet_tensorflow()
    weights = str(args.imagenet)
    report: dict[str, Any] = {}
    keys = {k for k in args.recipes.split(",") if k}
    known = {r.key for _, _, recipes in SETS.values() for r in recipes}
    if keys - known:
        parser.error(f"unknown recipes {sorted(keys - known)}; known: {sorted(known)}")
    for name in chosen:
        modality, prefix, recipes = SETS[name]
        recipes = tuple(r for r in recipes if not keys or r.key in keys)
        started = time.monotonic()
        items = [
            i
            for i in scan_modality(args.real / modality, modality)
            if i.patient_id.startswith(prefix)
        ]
        # Read once at the largest input; each recipe's preprocessing resizes from there.
        data = load_set(items, 256)
        labels = data.labels
        print(
            f"{name}: {len(set(labels))} identities, {len(labels)} images, "
            f"{args.folds}-fold identity-disjoint",
            flush=True,
        )
        found: dict[str, Any] = {}
        found["raw pixels (32 px)"] = cross_validate(
            raw_pixel_vectors([im if im.ndim == 2 else im.mean(axis=2) for im in data.images], 32),
            labels,
            fitted=False,
            folds=args.folds,
        )
        print(_line("raw pixels (32 px)", found["raw pixels (32 px)"]), flush=True)
        imagenet = Recipe("imagenet", "ImageNet features (224 px)", (), size=224)
        found[imagenet.name] = cross_validate(
            recipe_features(imagenet, data, weights), labels, fitted=False, folds=args.folds
        )
        print(_line(imagenet.name, found[imagenet.name]), flush=True)
        for recipe in recipes:
            tic = time.monotonic()
            features = recipe_features(recipe, data, weights)
            also_fit = tuple(
                recipe_features(recipe, data, weights, [flipped(im, flip) for im in data.images])
                for flip in recipe.fit_flips
            )
            found[recipe.name] = {
                **cross_validate(
                    features, labels, fitted=True, folds=args.folds, also_fit=also_fit
                ),
                "features": features.shape[1],
                "layers": list(recipe.layers),
                "grid": recipe.grid,
                "flips": list(recipe.flips),
                "fit_flips": list(recipe.fit_flips),
                "size": recipe.size,
                "shipped": recipe.shipped,
                "seconds": round(time.monotonic() - tic, 1),
            }
            label = f"{recipe.name}{' (shipped)' if recipe.shipped else ''}"
            print(_line(label, found[recipe.name]), flush=True)
        report[name] = {
            "modality": modality,
            "identities": len(set(labels)),
            "images": len(labels),
            "folds": args.folds,
            "methods": found,
            "seconds": round(time.monotonic() - started, 1),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
