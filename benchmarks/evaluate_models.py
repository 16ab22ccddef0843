"""The model figures of docs/models.md, in one run.

    python -m benchmarks.evaluate_models [--models models] [--out var/evaluation]
        [--imagenet PATH] [--real PATH] [--parts synthetic,real-compa,real-xray]

1. Synthetic, seeds never used in training (99): each default re-identification model beside
   the raw-pixel and ImageNet-feature baselines; COMPA's accuracy.
2. Real images (the folder given by --real, layout <modality>/<patient>/...): COMPA on X-ray, CT
   and MRI plus the ultrasound and nuclear-medicine images of the pydicom corpora as `other`.
   COMPA is retrained here on the synthetic training hospital plus half of the real patients,
   and measured on the other half, so no tested patient was seen in training.
3. Chest X-ray re-identification on real patients: trained on half of the patients, evaluated on
   the other half (patient-disjoint), with all images and with at most 5 per patient; both
   recipes, `finetune` (128 px, 15 epochs) and `frozen` (256 px).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.modelstore import discover
from synthetic.hospital import SynthOptions, generate
from training.compa import CompaConfig, train_compa
from training.evaluate import evaluate_compa, evaluate_reid, plot_confusion, plot_reid
from training.reid import ReidConfig, train_reid

OTHER_MODALITIES = {"US", "NM"}
PARTS = ("synthetic", "real-compa", "real-xray")
REAL_RECIPE_SIZE = {"finetune": 128, "frozen": 256}  # input px


def corpus_other(destination: Path) -> int:
    """Link the decodable US and NM images of the pydicom corpora as other/<name>/<file>."""
    from pydicom import dcmread

    from pipeline.decode import DecodeParams, decode_dataset
    from support.corpus import corpus_files

    count = 0
    for path in corpus_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path)
                if str(ds.get("Modality", "")) not in OTHER_MODALITIES or "PixelData" not in ds:
                    continue
                decode_dataset(ds, DecodeParams())
        except Exception:
            continue
        folder = destination / "other" / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(path, folder / f"{path.stem}.dcm")
        count += 1
    return count


def split_patients(source: Path, modality: str, train: Path, test: Path, seed: int) -> None:
    patients = sorted(p for p in (source / modality).iterdir() if p.is_dir())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    for rank, index in enumerate(order):
        side = train if rank % 2 == 0 else test
        target = side / modality / patients[index].name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(patients[index].resolve(), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("var/evaluation"))
    parser.add_argument(
        "--imagenet",
        default=str(
            Path("..")
            / "shared"
            / "weights"
            / "mobilenet_v2_1.0_224_torchvision_imagenet.weights.h5"
        ),
    )
    parser.add_argument("--real", type=Path, default=Path("..") / "shared" / "data" / "real")
    parser.add_argument("--train-data", type=Path, default=Path("var/models-data/train"))
    parser.add_argument("--volumes-data", type=Path, default=Path("var/models-data/volumes"))
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated, from {', '.join(PARTS)} (default: all)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    report: dict[str, Any] = {}
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.monotonic()

    if "synthetic" in parts:
        unseen = out / "synthetic-seed99"
        generate(SynthOptions(out=unseen, patients=50, visits=3, seed=99, slices=3))
        report["synthetic"] = {"dataset": "seed 99, 50 patients x 3 visits, 3 CT/MR slices"}
        served = discover(args.models)  # the newest model of each kind, as the service picks
        for modality in ("xray", "ct", "mri", "dermoscopy"):
            model = served[f"reid:{modality}"]
            evaluation = evaluate_reid(model, unseen, imagenet_weights=args.imagenet)
            plot_reid(evaluation, out / "plots" / f"synthetic-{modality}")
            report["synthetic"][modality] = evaluation.report
            print(
                json.dumps(
                    {
                        modality: {
                            k: evaluation.report[k]
                            for k in ("p_at_1", "map_at_r", "roc_auc", "eer")
                        }
                    }
                ),
                flush=True,
            )
        compa_synthetic = evaluate_compa(served["compa"], unseen)
        plot_confusion(compa_synthetic, out / "plots" / "synthetic-compa")
        report["synthetic"]["compa"] = compa_synthetic
        print("COMPA synthetic", compa_synthetic["accuracy"], flush=True)

    if args.real.is_dir() and parts & {"real-compa", "real-xray"}:
        halves = out / "real-halves"
        for modality in ("xray", "ct", "mri"):
            split_patients(args.real, modality, halves / "train", halves / "test", seed=5)
    if args.real.is_dir() and "real-compa" in parts:
        others = corpus_other(halves / "test")
        compa = train_compa(
            CompaConfig(backbone_weights=args.imagenet),
            [args.train_data, args.volumes_data, halves / "train"],
            out / "models",
            version="real-split",
        )
        compa_real = evaluate_compa(compa.folder, halves / "test")
        plot_confusion(compa_real, out / "plots" / "real-compa")
        report["real_compa"] = {
            **compa_real,
            "other_images": others,
            "trained_on": "synthetic seeds 21 and 22 + half of the real patients",
        }
        print("COMPA real", compa_real["accuracy"], compa_real["per_class_recall"], flush=True)
    if args.real.is_dir() and "real-xray" in parts:
        report["real_xray_reid"] = {}
        for recipe, size in REAL_RECIPE_SIZE.items():
            trained = train_reid(
                ReidConfig(
                    modality="xray",
                    backbone_weights=args.imagenet,
                    recipe=recipe,
                    size=size,
                    epochs=15,  # fine-tuning only
                ),
                halves / "train" / "xray",
                out / "models",
                version=f"real-half-{recipe}",
            )
            found: dict[str, Any] = {
                "training": trained.description["metrics"],
                "training_seconds": trained.description["training_seconds"],
            }
            for cap in (None, 5):
                evaluation = evaluate_reid(
                    trained.folder,
                    halves / "test",
                    imagenet_weights=args.imagenet,
                    max_per_patient=cap,
                )
                key = "all_images" if cap is None else f"at_most_{cap}_per_patient"
                plot_reid(evaluation, out / "plots" / f"real-xray-{recipe}-{key}")
                found[key] = evaluation.report
                print("real xray", recipe, key, json.dumps(evaluation.report), flush=True)
            report["real_xray_reid"][recipe] = found
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
