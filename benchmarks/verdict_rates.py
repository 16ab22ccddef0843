"""How well the default models catch wrong Modality tags and swapped patients, on a generated
hospital from a seed never used in training. Visit 1 is enrolled under the true identities;
visit 2 (with the deliberate errors) is analysed as the service would analyse it.

    python -m benchmarks.verdict_rates [--patients 100] [--seed 123] [--rate 0.1] [--slices 3]

With ``--real FOLDER`` (``<root>/<modality>/<identity>/<files>``, such as the real X-rays or
dermoscopy beside the checkout; ``--prefix`` keeps the identities whose folder starts so):
real images through the running service. The first image of every identity is enrolled
(``medreid enroll``); every other image is written as a Secondary Capture object (DX or XC)
under its identity, a ``--rate`` fraction under another enrolled identity instead, and sent by
DCMTK storescu to a fresh medreid with the default models. Per modality: the swapped images
caught (an identity mismatch), and the correctly filed images flagged, its false alarms.
With ``--holdout`` the served model's recipe is first fitted again on half of the identities,
and the other half is enrolled and judged: the default real-image models were fitted on every
development image, so without it the figures are in-sample. With ``--new-patients F`` a
fraction F of the identities is never enrolled and sent under its own PatientIDs: the share of
those images called another patient's is the false alarms on patients seen for the first time.

    python -m benchmarks.verdict_rates --real ../shared/data/real/xray --prefix kermany_
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

from pipeline.analysis import AnalysisSettings, HeaderFacts, ModelSet, analyse
from pipeline.gallery import GalleryIndex
from pipeline.modelstore import discover, generated_image_models, load_model
from pipeline.runner import PipelineConfig
from pipeline.series import ImageFinding, aggregate_series
from pipeline.verdicts import DEFAULT_TAG_MAP
from synthetic.hospital import SynthOptions, generate, read_manifest
from training.datasets.reader import load_image


def series_rates(
    rows: list[dict[str, str]], headers: list[HeaderFacts], analyses: list[Any]
) -> dict[str, Any]:
    """The same errors judged per series, as the service judges a complete series (a series
    of one image, X-ray or dermoscopy, is judged as its image)."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        members[row["series_instance_uid"]].append(i)
    counts: dict[str, int] = defaultdict(int)
    for indices in members.values():
        row, header = rows[indices[0]], headers[indices[0]]
        findings = [
            ImageFinding(
                predicted_modality=analyses[i].predicted_modality,
                identity_verdict=analyses[i].identity.verdict if analyses[i].identity else None,
                header_score=analyses[i].identity.header_score if analyses[i].identity else None,
                top_matches=analyses[i].top_matches,
                threshold=analyses[i].threshold,
                margin=analyses[i].margin,
            )
            for i in indices
        ]
        verdict = aggregate_series(
            findings,
            header_patient=header.patient_id,
            header_modality=header.modality,
            tag_map=DEFAULT_TAG_MAP,
            margin=AnalysisSettings().mismatch_margin,
        )
        wrong_tag, swapped = row["mislabelled"] == "True", row["swapped"] == "True"
        tag_flag = verdict.modality_verdict == "mismatch"
        patient_flag = verdict.identity_verdict == "mismatch"
        counts["series"] += 1
        counts["wrong_tags"] += wrong_tag
        counts["wrong_tags_caught"] += wrong_tag and tag_flag
        counts["right_tags_flagged"] += (not wrong_tag) and tag_flag
        counts["swaps"] += swapped
        counts["swaps_caught"] += swapped and patient_flag
        counts["not_swapped_flagged"] += (not swapped) and patient_flag
    c = counts
    return {
        "wrong_tag_recall": round(c["wrong_tags_caught"] / max(c["wrong_tags"], 1), 4),
        "wrong_tag_false_alarm_rate": round(
            c["right_tags_flagged"] / max(c["series"] - c["wrong_tags"], 1), 4
        ),
        "swap_recall": round(c["swaps_caught"] / max(c["swaps"], 1), 4),
        "swap_false_alarm_rate": round(
            c["not_swapped_flagged"] / max(c["series"] - c["swaps"], 1), 4
        ),
        **dict(c),
    }


REAL_TAGS = {"xray": "DX", "dermoscopy": "XC", "ct": "CT", "mri": "MR"}


def real_query(path: Path, modality: str, patient_id: str) -> Any:
    """A real picture as the Secondary Capture object a modality would send."""
    import cv2

    from support.dicom_factory import SECONDARY_CAPTURE, make_dataset

    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        return ds
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError(f"{path} is not a picture")
    if modality == "dermoscopy" and pixels.ndim == 3:
        pixels, photometric = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), "RGB"
    else:
        if pixels.ndim == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
        photometric = "MONOCHROME2"
    return make_dataset(
        np.ascontiguousarray(pixels),
        photometric=photometric,
        sop_class_uid=SECONDARY_CAPTURE,
        patient_id=patient_id,
        modality=REAL_TAGS[modality],
        ConversionType="WSD",
    )


def margin_rule(
    gaps: dict[bool, list[float]], model_margin: float | None, served_margin: float | None = None
) -> dict[str, Any]:
    """Another rule on the same scores: flag when another identity beats the header's by a
    margin, whatever the threshold. With the model's single calibrated margin (``margin`` in
    its model.json), the margin the service judged by (``margins`` read at the gallery's
    size, where the model has them), and the margin that flags 1% of these correctly filed
    images (chosen on them: an upper bound)."""
    swapped, correct = np.asarray(gaps[True]), np.asarray(gaps[False])
    if not len(swapped) or not len(correct):
        return {"scored": False}

    def rates(margin: float) -> dict[str, float]:
        return {
            "margin": round(margin, 4),
            "swap_recall": round(float((swapped >= margin).mean()), 4),
            "false_alarm_rate": round(float((correct >= margin).mean()), 4),
        }

    at_one_percent = float(np.nextafter(np.quantile(correct, 0.99, method="higher"), np.inf))
    return {
        "model_margin": rates(model_margin) if model_margin is not None else None,
        "served_margin": rates(served_margin) if served_margin is not None else None,
        "at_1pct_false_alarms_on_these_images": rates(at_one_percent),
    }


def holdout_models(
    args: argparse.Namespace,
    modality: str,
    identities: dict[str, list[Path]],
    names: list[str],
    work: Path,
) -> tuple[list[str], Path, int]:
    """The served model's recipe fitted again on half of the identities, beside the other
    served models: the judged half is then unseen by the model that judges it."""
    import random

    from training.evaluate import card_backbone_weights
    from training.reid import ReidConfig, train_reid

    served = discover(args.models)
    folder = served[f"reid:{modality}"]
    description = json.loads((folder / "model.json").read_text())
    weights = card_backbone_weights(folder, description)
    config = ReidConfig.of({**description["config"], "backbone_weights": weights})
    shuffled = sorted(names)
    random.Random(args.seed).shuffle(shuffled)
    fit, judged = sorted(shuffled[::2]), sorted(shuffled[1::2])
    fit_folder = work / "fit" / modality
    for name in fit:
        (fit_folder / name).mkdir(parents=True)
        for path in identities[name]:
            (fit_folder / name / path.name).symlink_to(path.resolve())
    models = work / "models"
    models.mkdir()
    for slot, other in served.items():
        if slot != f"reid:{modality}":
            (models / other.name).symlink_to(other.resolve())
    train_reid(config, fit_folder, models, version="holdout")
    return judged, models, len(fit)


def real_rates(args: argparse.Namespace) -> dict[str, Any]:
    """The service's verdicts on real images (see the module's note)."""
    import random
    import shutil
    import subprocess

    from sqlalchemy import select

    from storage.db import make_engine, make_sessionmaker, upgrade
    from storage.models import Instance, Result
    from support.service import RunningService, wait_for_queue
    from training.datasets.reader import scan_modality

    if shutil.which("storescu") is None:
        raise SystemExit("DCMTK's storescu is needed (Debian: dcmtk)")
    folder: Path = args.real
    modality = folder.name
    if modality not in REAL_TAGS:
        raise SystemExit(f"{folder}: the folder's name must be a modality ({', '.join(REAL_TAGS)})")
    identities: dict[str, list[Path]] = defaultdict(list)
    for item in scan_modality(folder, modality):
        if item.patient_id.startswith(args.prefix):
            identities[item.patient_id].append(item.path)
    rng = random.Random(args.seed)
    names = sorted(identities)
    if args.identities and len(names) > args.identities:
        names = sorted(rng.sample(names, args.identities))
    work = Path(tempfile.mkdtemp(prefix="medreid-verdicts-"))
    models = args.models.resolve()
    fitted_on = 0
    if args.holdout:
        names, models, fitted_on = holdout_models(args, modality, identities, names, work)
    gallery, queries = work / "gallery" / modality, work / "queries"
    queries.mkdir(parents=True)
    # Identities never enrolled, their every image sent under their own PatientID: the
    # patients a hospital sees for the first time (their own generator, so that the rest of
    # the draw is the same with or without them).
    newcomers = set(
        random.Random(args.seed + 1).sample(names, round(args.new_patients * len(names)))
    )
    enrolled_names = [n for n in names if n not in newcomers]
    truth: dict[str, tuple[str, bool]] = {}  # SOP instance UID -> (identity, swapped)

    def send(path: Path, header: str) -> str:
        ds = real_query(path, modality, header)
        ds.save_as(queries / f"{len(truth):06d}.dcm", enforce_file_format=True)
        return str(ds.SOPInstanceUID)

    for name in names:
        if name in newcomers:
            for path in identities[name]:
                truth[send(path, name)] = (name, False)
            continue
        first, *rest = identities[name]
        (gallery / name).mkdir(parents=True)
        (gallery / name / first.name).symlink_to(first.resolve())
        for path in rest:
            swapped = rng.random() < args.rate
            header = rng.choice([n for n in enrolled_names if n != name]) if swapped else name
            truth[send(path, header)] = (name, swapped)
    url = f"sqlite:///{work / 'medreid.sqlite3'}"
    upgrade(url)
    service = RunningService.on(work, url, MEDREID_MODELS_DIR=str(models))
    enrolled = service.cli("enroll", str(gallery.parent)).stdout.strip()
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    service.start(timeout=180)
    started = time.monotonic()
    try:
        sent = subprocess.run(
            ["storescu", "-aec", "MEDREID", "+sd", "127.0.0.1", str(service.port), str(queries)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr[-2000:]}")
        wait_for_queue(sessions, timeout=3600)
        seconds = time.monotonic() - started
        with sessions.begin() as session:
            rows = session.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.patient_id,
                    Result.identity_verdict,
                    Result.modality_verdict,
                    Result.identity_header_score,
                    Result.top_matches,
                    Result.identity_margin,
                ).join(Result, Result.instance_id == Instance.id)
            ).all()
    finally:
        service.stop()
        engine.dispose()
    found = {row[0]: row[1:] for row in rows}
    counts: dict[str, int] = defaultdict(int)
    gaps: dict[bool, list[float]] = {True: [], False: []}
    served = discover(models)[f"reid:{modality}"]
    description = json.loads((served / "model.json").read_text())
    model_margin = description.get("margin")
    applied = [row[-1] for row in found.values() if row[-1] is not None]
    served_margin = float(np.median(applied)) if applied else None
    for uid, (name, swapped) in truth.items():
        header, identity, tag, header_score, matches, _ = found.get(
            uid, (None, "not judged", None, None, None, None)
        )
        kind = "new" if name in newcomers else "swapped" if swapped else "correct"
        counts[f"{kind}"] += 1
        counts[f"{kind}_{identity}"] += 1
        counts["modality_mismatch"] += tag == "mismatch"
        others = [m["score"] for m in matches or [] if m["patient_id"] != header]
        if header_score is not None and others:
            gaps[swapped].append(max(others) - header_score)
        if kind == "new" and others:
            # the rule before stranger thresholds: any other patient at the per-pair threshold
            counts["new_over_pair_threshold"] += max(others) >= description["threshold"]
    swaps, correct = counts["swapped"], counts["correct"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "dataset": f"{folder} ({args.prefix or 'all'}*)",
        "modality": modality,
        "identities": len(names),
        "model": served.name,
        "model_fitted_on_other_identities": fitted_on,
        "enrolled": enrolled,
        "queries": len(truth),
        "swap_rate": args.rate,
        "swap_recall": round(counts["swapped_mismatch"] / max(swaps, 1), 4),
        "false_alarm_rate": round(counts["correct_mismatch"] / max(correct, 1), 4),
        "modality_false_alarm_rate": round(counts["modality_mismatch"] / max(len(truth), 1), 4),
        "new_patients": len(newcomers),
        # a first image of a patient never enrolled, called another patient's
        "new_patient_false_alarm_rate": (
            round(counts["new_mismatch"] / counts["new"], 4) if counts["new"] else None
        ),
        "new_patient_false_alarm_rate_at_the_pair_threshold": (
            round(counts["new_over_pair_threshold"] / counts["new"], 4) if counts["new"] else None
        ),
        "margin_rule": margin_rule(gaps, model_margin, served_margin),
        **dict(sorted(counts.items())),
        "seconds_to_judge": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--rate", type=float, default=0.1, help="swap and mislabel rate")
    parser.add_argument("--slices", type=int, default=3, help="CT and MRI slices per series")
    parser.add_argument("--real", type=Path, help="<root>/<modality> of real images instead")
    parser.add_argument("--prefix", default="", help="--real: identities starting so")
    parser.add_argument(
        "--identities", type=int, default=0, help="--real: at most this many (default: all)"
    )
    parser.add_argument(
        "--new-patients",
        type=float,
        default=0.0,
        help="--real: this fraction of the identities is never enrolled and its images are sent "
        "under their own PatientIDs, as patients seen for the first time",
    )
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="--real: fit the served model's recipe again on half of the identities and judge "
        "the other half (the served model was fitted on these very images)",
    )
    args = parser.parse_args()
    if args.real is not None:
        print(json.dumps(real_rates(args), indent=2))
        return
    started = time.monotonic()
    config = PipelineConfig()
    with tempfile.TemporaryDirectory() as scratch:
        # a generated hospital is judged by the models made for generated patients, as the
        # demo's is: the real-image models are fitted on real ones
        folders = discover(generated_image_models(args.models, Path(scratch) / "models"))
        models = ModelSet(
            compa=load_model("compa", folders["compa"]),
            reid={
                slot.split(":")[1]: load_model(slot, f)
                for slot, f in folders.items()
                if slot != "compa"
            },
        )
        out = Path(scratch) / "hospital"
        generate(
            SynthOptions(
                out=out,
                patients=args.patients,
                visits=2,
                seed=args.seed,
                slices=args.slices,
                mislabel_modality=args.rate,
                swap_patient=args.rate,
            )
        )
        rows = list(read_manifest(out / "manifest.csv"))
        galleries: dict[str, GalleryIndex] = {}
        for modality, embedder in models.reid.items():
            enrolled = [r for r in rows if r["visit"] == "1" and r["true_modality"] == modality]
            vectors = embedder.embed([load_image(out / r["path"], config) for r in enrolled])
            galleries[modality] = GalleryIndex(dim=vectors.shape[1])
            galleries[modality].add([r["true_patient"] for r in enrolled], vectors)
        second = [r for r in rows if r["visit"] == "2"]
        import pydicom

        headers = []
        for r in second:
            ds = pydicom.dcmread(out / r["path"], stop_before_pixels=True)
            headers.append(HeaderFacts(str(ds.PatientID), str(ds.Modality)))
        images = [load_image(out / r["path"], config) for r in second]
        analysis_started = time.monotonic()
        analyses = []
        for start in range(0, len(images), 32):
            analyses += analyse(
                images[start : start + 32],
                headers[start : start + 32],
                models,
                galleries,
                AnalysisSettings(),
            )
        analysis_seconds = time.monotonic() - analysis_started
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row, analysis in zip(second, analyses, strict=True):
        for scope in ("all", row["true_modality"]):
            c = counts[scope]
            wrong_tag = row["mislabelled"] == "True"
            flagged_tag = analysis.modality_verdict == "mismatch"
            c["wrong_tags"] += wrong_tag
            c["wrong_tags_caught"] += wrong_tag and flagged_tag
            c["right_tags"] += not wrong_tag
            c["right_tags_flagged"] += (not wrong_tag) and flagged_tag
            swapped = row["swapped"] == "True"
            flagged_patient = (
                analysis.identity is not None and analysis.identity.verdict == "mismatch"
            )
            c["swaps"] += swapped
            c["swaps_caught"] += swapped and flagged_patient
            c["not_swapped"] += not swapped
            c["not_swapped_flagged"] += (not swapped) and flagged_patient
    report: dict[str, Any] = {}
    for scope, c in counts.items():
        report[scope] = {
            "images": c["wrong_tags"] + c["right_tags"],
            "wrong_tag_recall": round(c["wrong_tags_caught"] / max(c["wrong_tags"], 1), 4),
            "wrong_tag_false_alarm_rate": round(
                c["right_tags_flagged"] / max(c["right_tags"], 1), 4
            ),
            "swap_recall": round(c["swaps_caught"] / max(c["swaps"], 1), 4),
            "swap_false_alarm_rate": round(c["not_swapped_flagged"] / max(c["not_swapped"], 1), 4),
            **{k: int(v) for k, v in c.items()},
        }
    report["series"] = series_rates(second, headers, analyses)
    report["ms_per_image_models"] = round(analysis_seconds * 1000 / max(len(second), 1), 2)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["models"] = models.versions()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
