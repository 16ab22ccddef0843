"""The synthetic hospital: multi-patient, multi-visit DICOM studies for X-ray, CT, MRI and
dermoscopy, with a ground-truth manifest and optional deliberate header errors.

Files are laid out by ground truth, ``OUT/<true modality>/<true patient>/<visit>_<n>.dcm``
(the dataset layout), while the DICOM headers carry what a hospital's systems would: including,
when asked for, a wrong Modality tag or another patient's identity. ``manifest.csv`` gives both.
Everything is a pure function of the seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from synthetic import anatomy, brain, skin
from synthetic.people import Person, people, rng_for, uid_for

MODALITIES = ("xray", "ct", "mri", "dermoscopy")
# The header Modality a device of each kind writes, and what a mislabelled series gets instead.
HEADER_MODALITY_CHOICES = {
    "xray": ("CR", "DX"),
    "ct": ("CT",),
    "mri": ("MR",),
    "dermoscopy": ("DMS", "XC"),
}
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "VL": "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
}
IMAGE_SIZE = {"xray": 512, "ct": 512, "mri": 256, "dermoscopy": 384}
DEVICES = {
    "xray": [
        ("Northwind Imaging", "NX CR-400", "CR"),
        ("Acme Medical", "Radiant DX 500", "DX"),
        ("Helios", "Lumen DR", "DX"),
    ],
    "ct": [
        ("Acme Medical", "Helix 64", "CT"),
        ("Northwind Imaging", "Orbit 128", "CT"),
        ("Helios", "Spiral 16", "CT"),
    ],
    "mri": [("Helios", "Magna 1.5T", "MR"), ("Acme Medical", "Tesla 3T", "MR")],
    "dermoscopy": [("Dermalux", "DL-200", "DMS"), ("Skinview", "Polar 3", "XC")],
}
FIRST_STUDY = dt.date(2021, 3, 1)
# Slices of a series are spread over the volume (relative levels), not adjacent: adjacent
# slices would be near-copies of each other.
CT_SLICE_GAP = 0.3
MR_SLICE_GAP = 0.2


@dataclass(frozen=True)
class SynthOptions:
    out: Path
    patients: int = 20
    visits: int = 3
    modalities: tuple[str, ...] = MODALITIES
    seed: int = 0
    fmt: str = "dicom"  # "dicom" or "png"
    slices: int = 3  # CT and MRI slices per visit
    mislabel_modality: float = 0.0
    swap_patient: float = 0.0
    workers: int = 2


@dataclass(frozen=True)
class SeriesPlan:
    """One visit of one patient in one modality: what is true and what the header says."""

    patient: Person
    header_patient: Person
    modality: str
    header_modality: str
    visit: int
    device: tuple[str, str, str]
    study_date: str


@dataclass
class ManifestRow:
    path: str
    true_patient: str
    true_modality: str
    header_patient: str
    header_modality: str
    visit: int
    index: int
    swapped: bool
    mislabelled: bool
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    manufacturer: str
    model: str


MANIFEST_FIELDS = [f.name for f in ManifestRow.__dataclass_fields__.values()]


def plan(options: SynthOptions) -> list[SeriesPlan]:
    """Every series to generate, with the deliberate header errors decided up front."""
    persons = people(options.seed, options.patients)
    rng = rng_for(options.seed, "plan")
    series = []
    for person in persons:
        for modality in options.modalities:
            for visit in range(options.visits):
                device = DEVICES[modality][int(rng.integers(len(DEVICES[modality])))]
                header_modality = device[2]
                if options.mislabel_modality and rng.random() < options.mislabel_modality:
                    others = [m for m in MODALITIES if m != modality]
                    wrong = others[int(rng.integers(len(others)))]
                    header_modality = HEADER_MODALITY_CHOICES[wrong][0]
                header_patient = person
                if (
                    options.swap_patient
                    and len(persons) > 1
                    and rng.random() < options.swap_patient
                ):
                    other = int(rng.integers(len(persons) - 1))
                    header_patient = persons[other if other < person.index else other + 1]
                date = FIRST_STUDY + dt.timedelta(
                    days=int(visit * 200 + rng.integers(0, 60) + person.index % 30)
                )
                series.append(
                    SeriesPlan(
                        person,
                        header_patient,
                        modality,
                        header_modality,
                        visit,
                        device,
                        date.strftime("%Y%m%d"),
                    )
                )
    return series


# --------------------------------------------------------------------------- pixels


def patient_anatomy(seed: int, person: Person, modality: str) -> Any:
    rng = rng_for(seed, "anatomy", person.index, modality)
    if modality == "xray":
        return anatomy.ChestAnatomy.draw(rng, female=person.sex == "F")
    if modality == "ct":
        return anatomy.AbdomenAnatomy.draw(rng)
    if modality == "mri":
        return brain.BrainAnatomy.draw(rng)
    return skin.LesionAnatomy.draw(rng)


@dataclass(frozen=True)
class RenderedImage:
    pixels: np.ndarray  # float32: attenuation, HU, MR signal, or RGB in [0, 1]
    attributes: dict[str, Any] = field(default_factory=dict)


def render_series(seed: int, plan_item: SeriesPlan, slices: int) -> list[RenderedImage]:
    modality = plan_item.modality
    size = IMAGE_SIZE[modality]
    body = patient_anatomy(seed, plan_item.patient, modality)
    rng = rng_for(seed, "visit", plan_item.patient.index, modality, plan_item.visit)
    if modality == "xray":
        return [RenderedImage(anatomy.render_chest(body, plan_item.visit, rng, size))]
    if modality == "dermoscopy":
        return [RenderedImage(skin.render_dermoscopy(body, plan_item.visit, rng, size))]
    images = []
    start = body.z_start + rng.uniform(-0.04, 0.04)
    pose = anatomy.series_pose(rng, modality)
    if modality == "ct":
        contrast = bool(rng.random() < 0.5)
        for k in range(slices):
            z = start + CT_SLICE_GAP * k
            pixels = anatomy.render_ct(body, z, contrast, rng, size, pose)
            images.append(RenderedImage(pixels, {"z": z, "contrast": contrast}))
    else:
        weighting = "T1" if rng.random() < 0.5 else "T2"
        signal_scale = rng.uniform(600, 1800)  # MR units differ between sessions
        for k in range(slices):
            z = start + MR_SLICE_GAP * k
            pixels = brain.render_brain(body, z, weighting, rng, size, pose, signal_scale)
            images.append(RenderedImage(pixels, {"z": z, "weighting": weighting}))
    return images


def to_stored(
    modality: str, image: RenderedImage, monochrome1: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored pixel values and the pixel-module attributes for them."""
    pixels = image.pixels
    if modality == "dermoscopy":
        return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8), {
            "SamplesPerPixel": 3,
            "PhotometricInterpretation": "RGB",
            "PlanarConfiguration": 0,
            "BitsAllocated": 8,
            "BitsStored": 8,
            "HighBit": 7,
            "PixelRepresentation": 0,
        }
    grey = {
        "SamplesPerPixel": 1,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
    }
    if modality == "ct":
        stored = np.clip(np.rint(pixels + 1024), 0, 4095).astype(np.uint16)
        return stored, {
            **grey,
            "PhotometricInterpretation": "MONOCHROME2",
            "RescaleIntercept": -1024,
            "RescaleSlope": 1,
            "RescaleType": "HU",
            "WindowCenter": 40,
            "WindowWidth": 400,
        }
    if modality == "mri":
        return np.clip(np.rint(pixels), 0, 4095).astype(np.uint16), {
            **grey,
            "PhotometricInterpretation": "MONOCHROME2",
        }
    values = np.clip(np.rint(pixels * 4095), 0, 4095).astype(np.uint16)
    if monochrome1:
        values = (4095 - values).astype(np.uint16)
    return values, {
        **grey,
        "PhotometricInterpretation": "MONOCHROME1" if monochrome1 else "MONOCHROME2",
    }


def to_png(modality: str, image: RenderedImage) -> np.ndarray:
    pixels = image.pixels
    if modality == "dermoscopy":
        rgb = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb[:, :, ::-1])  # OpenCV writes BGR
    if modality == "ct":
        pixels = np.clip((pixels - (40 - 200)) / 400, 0, 1)
    elif modality == "mri":
        high = float(np.percentile(pixels, 99.5)) or 1.0
        pixels = np.clip(pixels / high, 0, 1)
    return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- DICOM


def build_dataset(
    seed: int, item: SeriesPlan, index: int, image: RenderedImage
) -> tuple[Dataset, str]:
    modality = item.modality
    header_code = item.header_modality
    sop_class = SOP_CLASSES["VL"] if modality == "dermoscopy" else SOP_CLASSES[item.device[2]]
    # A mislabelled series keeps the SOP class of what it really is; only the tag lies.
    monochrome1 = modality == "xray" and item.device[0] == "Northwind Imaging"
    stored, pixel_attributes = to_stored(modality, image, monochrome1)
    key = (item.patient.index, modality, item.visit)
    study_uid = uid_for(seed, "study", item.patient.index, item.visit)
    series_uid = uid_for(seed, "series", *key)
    instance_uid = uid_for(seed, "instance", *key, index)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1184.1")
    ds.file_meta.ImplementationVersionName = "MEDREID_SYNTH"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(instance_uid)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = item.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{9 + item.visit % 8:02d}{index % 60:02d}00"
    ds.AccessionNumber = f"A{int(study_uid[5:15]):010d}"
    ds.Modality = header_code
    ds.Manufacturer, ds.ManufacturerModelName = item.device[0], item.device[1]
    ds.InstitutionName = "medreid Synthetic Hospital"
    ds.StationName = item.device[1][:16]
    ds.PatientName = item.header_patient.name
    ds.PatientID = item.header_patient.patient_id
    ds.PatientBirthDate = item.header_patient.birth_date
    ds.PatientSex = item.header_patient.sex
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.StudyID = str(item.visit + 1)
    ds.SeriesNumber = MODALITIES.index(modality) + 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "xray":
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.SeriesDescription = "Chest PA"
        if item.device[2] == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
    elif modality == "ct":
        ds.BodyPartExamined = "ABDOMEN"
        ds.SeriesDescription = "Abdomen" + (" C+" if image.attributes["contrast"] else "")
        ds.KVP = 120
        ds.SliceThickness = 5.0
        ds.SliceLocation = round(-100.0 - 50.0 * float(image.attributes["z"]), 2)
        ds.ImagePositionPatient = [-250.0, -250.0, float(ds.SliceLocation)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.9765625, 0.9765625]
    elif modality == "mri":
        weighting = image.attributes["weighting"]
        ds.BodyPartExamined = "HEAD"
        ds.SeriesDescription = f"{weighting} AX"
        ds.ScanningSequence = "SE"
        ds.RepetitionTime = 500 if weighting == "T1" else 4000
        ds.EchoTime = 12 if weighting == "T1" else 100
        ds.MagneticFieldStrength = 3.0 if "3T" in item.device[1] else 1.5
        ds.SliceLocation = round(20.0 * float(image.attributes["z"]) * 5, 2)
        ds.SliceThickness = 5.0
        ds.PixelSpacing = [0.9, 0.9]
    else:
        ds.BodyPartExamined = "SKIN"
        ds.SeriesDescription = "Dermoscopy"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    for keyword, value in pixel_attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds, instance_uid


def _write_series(args: tuple[SynthOptions, SeriesPlan]) -> list[ManifestRow]:
    options, item = args
    images = render_series(options.seed, item, options.slices)
    folder = options.out / item.modality / item.patient.patient_id
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, image in enumerate(images):
        stem = f"v{item.visit + 1}_{index + 1:02d}"
        if options.fmt == "png":
            path = folder / f"{stem}.png"
            cv2.imwrite(str(path), to_png(item.modality, image))
            sop_class = instance_uid = ""
        else:
            path = folder / f"{stem}.dcm"
            ds, instance_uid = build_dataset(options.seed, item, index, image)
            dcmwrite(path, ds, enforce_file_format=True)
            sop_class = str(ds.SOPClassUID)
        rows.append(
            ManifestRow(
                path=str(path.relative_to(options.out)),
                true_patient=item.patient.patient_id,
                true_modality=item.modality,
                header_patient=item.header_patient.patient_id,
                header_modality=item.header_modality,
                visit=item.visit + 1,
                index=index + 1,
                swapped=item.header_patient != item.patient,
                mislabelled=item.header_modality not in HEADER_MODALITY_CHOICES[item.modality],
                sop_class_uid=sop_class,
                sop_instance_uid=instance_uid,
                study_instance_uid=uid_for(options.seed, "study", item.patient.index, item.visit)
                if options.fmt == "dicom"
                else "",
                series_instance_uid=uid_for(
                    options.seed, "series", item.patient.index, item.modality, item.visit
                )
                if options.fmt == "dicom"
                else "",
                manufacturer=item.device[0],
                model=item.device[1],
            )
        )
    return rows


def generate(
    options: SynthOptions, progress: Callable[[int, int], None] | None = None
) -> list[ManifestRow]:
    """Write the hospital and its manifest; returns the manifest rows."""
    if options.fmt not in ("dicom", "png"):
        raise ValueError(f"format must be dicom or png, not {options.fmt!r}")
    if options.fmt == "png" and (options.mislabel_modality or options.swap_patient):
        raise ValueError("header errors need DICOM headers: use --format dicom")
    unknown = set(options.modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(
            f"unknown modalities {sorted(unknown)}; choose from {', '.join(MODALITIES)}"
        )
    options.out.mkdir(parents=True, exist_ok=True)
    items = plan(options)
    rows: list[ManifestRow] = []
    work = [(options, item) for item in items]
    if options.workers > 1:
        context = multiprocessing.get_context("fork")
        with context.Pool(options.workers) as pool:
            for done, series_rows in enumerate(pool.imap(_write_series, work, chunksize=4), 1):
                rows += series_rows
                if progress:
                    progress(done, len(work))
    else:
        for done, item in enumerate(work, 1):
            rows += _write_series(item)
            if progress:
                progress(done, len(work))
    write_manifest(options.out / "manifest.csv", rows)
    return rows


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_manifest(path: Path) -> Iterator[dict[str, str]]:
    with path.open(newline="") as handle:
        yield from csv.DictReader(handle)
