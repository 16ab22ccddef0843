"""How well the default models catch wrong Modality tags and swapped patients, on a generated
hospital from a seed never used in training. Visit 1 is enrolled under the true identities;
visit 2 (with the deliberate errors) is analysed as the service would analyse it.

    python -m benchmarks.verdict_rates [--patients 100] [--seed 123] [--rate 0.1] [--slices 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.analysis import AnalysisSettings, HeaderFacts, ModelSet, analyse
from pipeline.gallery import GalleryIndex
from pipeline.modelstore import discover, load_model
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--rate", type=float, default=0.1, help="swap and mislabel rate")
    parser.add_argument("--slices", type=int, default=3, help="CT and MRI slices per series")
    args = parser.parse_args()
    started = time.monotonic()
    folders = discover(args.models)
    models = ModelSet(
        compa=load_model("compa", folders["compa"]),
        reid={
            slot.split(":")[1]: load_model(slot, f)
            for slot, f in folders.items()
            if slot != "compa"
        },
    )
    config = PipelineConfig()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
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
