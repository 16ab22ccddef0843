"""The synthetic hospital: valid DICOM, as specified, deterministic, manifest = headers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.decode import DecodeParams, decode_dataset
from synthetic.hospital import (
    MODALITIES,
    SOP_CLASSES,
    SynthOptions,
    generate,
    read_manifest,
)

EXPECTED = {
    "xray": ({SOP_CLASSES["CR"], SOP_CLASSES["DX"]}, {"CR", "DX"}),
    "ct": ({SOP_CLASSES["CT"]}, {"CT"}),
    "mri": ({SOP_CLASSES["MR"]}, {"MR"}),
    "dermoscopy": ({SOP_CLASSES["VL"]}, {"DMS", "XC"}),
}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hospital")
    generate(
        SynthOptions(
            out=out, patients=6, visits=2, seed=3, slices=2, mislabel_modality=0.3, swap_patient=0.3
        )
    )
    return out


def test_every_file_reads_and_decodes_as_specified(hospital: Path) -> None:
    rows = list(read_manifest(hospital / "manifest.csv"))
    assert len(rows) == 6 * 2 * (1 + 2 + 2 + 1)
    for row in rows:
        ds = pydicom.dcmread(hospital / row["path"])
        modality = row["true_modality"]
        sop_classes, codes = EXPECTED[modality]
        assert ds.SOPClassUID in sop_classes
        image = decode_dataset(ds, DecodeParams())
        if modality == "dermoscopy":
            assert ds.PhotometricInterpretation == "RGB" and ds.BitsStored == 8
            assert image.frames.shape[-1] == 3
        else:
            assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
            assert ds.BitsAllocated == 16 and ds.BitsStored == 12
            assert image.frames.ndim == 3
        if modality == "ct":
            assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
        if row["mislabelled"] == "False":
            assert ds.Modality in codes
        # a coherent header
        for keyword in (
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "StudyDate",
            "Manufacturer",
            "ManufacturerModelName",
        ):
            assert ds.get(keyword), keyword
        assert float(image.frames.min()) >= 0.0 and float(image.frames.max()) <= 1.0
        assert float(image.frames.std()) > 0.01, f"{row['path']} is blank"


def test_manifest_agrees_with_headers_including_the_errors(hospital: Path) -> None:
    rows = list(read_manifest(hospital / "manifest.csv"))
    swapped = mislabelled = 0
    for row in rows:
        ds = pydicom.dcmread(hospital / row["path"], stop_before_pixels=True)
        assert ds.PatientID == row["header_patient"]
        assert ds.Modality == row["header_modality"]
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.StudyInstanceUID == row["study_instance_uid"]
        assert Path(row["path"]).parts[:2] == (row["true_modality"], row["true_patient"])
        if row["swapped"] == "True":
            swapped += 1
            assert row["header_patient"] != row["true_patient"]
        else:
            assert row["header_patient"] == row["true_patient"]
        if row["mislabelled"] == "True":
            mislabelled += 1
            assert ds.Modality not in EXPECTED[row["true_modality"]][1]
    assert swapped > 0 and mislabelled > 0
    uids = Counter(row["sop_instance_uid"] for row in rows)
    assert max(uids.values()) == 1


def test_the_same_seed_gives_byte_identical_files(tmp_path: Path, hospital: Path) -> None:
    again = tmp_path / "again"
    generate(
        SynthOptions(
            out=again,
            patients=6,
            visits=2,
            seed=3,
            slices=2,
            mislabel_modality=0.3,
            swap_patient=0.3,
            workers=1,
        )
    )

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")
            if p.is_file()
        }

    assert digests(again) == digests(hospital)
    other = tmp_path / "other"
    generate(SynthOptions(out=other, patients=2, visits=1, seed=4, modalities=("xray",)))
    first = next((other / "xray").rglob("*.dcm"))
    mine = hospital / "xray" / first.parent.name.replace("SYN004", "SYN003") / first.name
    assert pydicom.dcmread(first).PixelData != pydicom.dcmread(mine).PixelData


def test_patients_persist_across_visits_more_than_between_patients(tmp_path: Path) -> None:
    """Each patient's own visits resemble each other more than other patients' do (on average),
    which is what makes identity learnable."""
    from pipeline.models.backbone import resize
    from pipeline.runner import PipelineConfig
    from training.datasets.reader import load_image, scan
    from training.metrics import cosine_similarity, pair_scores

    generate(SynthOptions(out=tmp_path, patients=8, visits=3, seed=5, slices=1, workers=1))
    for modality in MODALITIES:
        items = scan(tmp_path, [modality])
        vectors = np.stack(
            [resize(load_image(i.path, PipelineConfig()), 48).reshape(-1) for i in items]
        )
        vectors -= vectors.mean(axis=0)
        scores, genuine = pair_scores(cosine_similarity(vectors), [i.patient_id for i in items])
        assert scores[genuine].mean() > scores[~genuine].mean(), modality


def test_png_format_and_command_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "medreid.cli",
            "synth",
            "--out",
            str(tmp_path / "png"),
            "--patients",
            "2",
            "--visits",
            "2",
            "--format",
            "png",
            "--modalities",
            "xray,dermoscopy",
            "--preview",
            str(tmp_path / "preview.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("8 files for 2 patients x 2 visits")
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert len(pngs) == 8
    assert (tmp_path / "preview.png").stat().st_size > 10_000
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "medreid.cli",
            "synth",
            "--out",
            str(tmp_path / "x"),
            "--format",
            "png",
            "--swap-patient",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "DICOM headers" in refused.stderr
