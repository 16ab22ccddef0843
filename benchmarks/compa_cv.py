"""COMPA under identity-disjoint cross-validation on real images, beside the served model.

    python -m benchmarks.compa_cv [--real ../shared/data/real] [--folds 5]
        [--generated var/models-data/train var/models-data/volumes] [--models models]

The backbone features of the generated training hospitals, of every real image and of the
pydicom corpora's ultrasound and nuclear-medicine images (`other`) are extracted once. Each
fold holds out a fifth of the real identities of each modality (patients; lesions for
HAM10000). COMPA is fitted on the generated images and the remaining real identities (its
references, temperature and `other` logit; the corpora's images never) and measured on the
held-out identities, per modality and per collection. The corpora's images must come out
`other`. The served model is measured on the same held-out images in the same run.
Prints the mean and the spread (min, max) over the folds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evaluate_models import corpus_other
from pipeline.models.compa import KNOWN, OTHER, load_compa
from pipeline.modelstore import discover
from training.compa import (
    CompaConfig,
    compa_features,
    fit_compa,
    split_patients_per_modality,
)

IMAGENET = (
    Path("..") / "shared" / "weights" / "mobilenet_v2_1.0_224_torchvision_imagenet.weights.h5"
)


def folds_of(
    identities: list[tuple[str, str]], folds: int, seed: int
) -> dict[tuple[str, str], int]:
    """Each real identity's fold, dealt out within each modality."""
    rng = np.random.default_rng(seed)
    fold: dict[tuple[str, str], int] = {}
    for modality in sorted({m for m, _ in identities}):
        members = sorted({i for i in identities if i[0] == modality})
        for rank, index in enumerate(rng.permutation(len(members))):
            fold[members[index]] = rank % folds
    return fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=Path("..") / "shared" / "data" / "real")
    parser.add_argument(
        "--generated",
        type=Path,
        nargs="+",
        default=[Path("var/models-data/train"), Path("var/models-data/volumes")],
    )
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--imagenet", default=str(IMAGENET))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/compa_cv.json"))
    args = parser.parse_args()
    started = time.monotonic()
    config = CompaConfig(backbone_weights=args.imagenet)
    with tempfile.TemporaryDirectory() as scratch:
        others = corpus_other(Path(scratch))
        found = compa_features(config, [*args.generated, args.real, Path(scratch)])
    real_source = {
        s
        for s, item in zip(found.source, found.items, strict=True)
        if str(item.path).startswith(str(args.real))
    }
    is_real = np.array(
        [
            int(s) in real_source and m != OTHER
            for s, m in zip(found.source, found.modality, strict=True)
        ]
    )
    is_other = found.modality == OTHER
    identities = [
        (i.modality, i.patient_id) for i, r in zip(found.items, is_real, strict=True) if r
    ]
    fold = folds_of(identities, args.folds, args.seed)
    served = load_compa(discover(args.models)["compa"])
    per_fold: dict[str, list[float]] = defaultdict(list)
    served_fold: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for k in range(args.folds):
        held = [
            n
            for n, item in enumerate(found.items)
            if is_real[n] and fold[(item.modality, item.patient_id)] == k
        ]
        train = [
            n
            for n in range(len(found.items))
            if not is_other[n]
            and not (is_real[n] and fold[(found.items[n].modality, found.items[n].patient_id)] == k)
        ]
        # the temperature and `other` logit on held-out training patients, as train_compa
        fit, val = split_patients_per_modality(
            [found.items[n] for n in train], config.validation_fraction, k
        )
        fit_idx, val_idx = [train[i] for i in fit], [train[i] for i in val]
        model, _ = fit_compa(found, fit_idx, val_idx, config)
        labels = (*KNOWN, OTHER)
        for name, predictor, sink in (("cv", model, per_fold), ("served", served, served_fold)):
            test = held + [n for n in range(len(found.items)) if is_other[n]]
            predicted = [
                labels[int(np.argmax(p))]
                for p in predictor.probabilities(predictor.similarities(found.features[test]))
            ]
            groups: dict[str, list[bool]] = defaultdict(list)
            for n, guess in zip(test, predicted, strict=True):
                item = found.items[n]
                truth = item.modality
                groups[truth].append(guess == truth)
                if truth != OTHER:
                    groups[f"{truth}/{found.collection[n]}"].append(guess == truth)
            for group, hits in groups.items():
                sink[group].append(float(np.mean(hits)))
                if name == "cv":  # each real image is held out once; `other` is in every fold
                    counts[group] = counts[group] + len(hits) if group != OTHER else len(hits)
    report: dict[str, Any] = {"folds": args.folds, "other_images": others, "images": {}}
    for group in sorted(per_fold):
        cv, old = per_fold[group], served_fold[group]
        report["images"][group] = counts[group]
        report[group] = {
            "cv_accuracy_mean": round(float(np.mean(cv)), 4),
            "cv_accuracy_min": round(float(np.min(cv)), 4),
            "cv_accuracy_max": round(float(np.max(cv)), 4),
            "served_model_accuracy_mean": round(float(np.mean(old)), 4),
        }
    report["served_model"] = served.version
    report["seconds"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
