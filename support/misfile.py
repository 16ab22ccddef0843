"""Misfiling a generated hospital's second visits on purpose: whole series filed under
another patient, as a wrong worklist entry does."""

from __future__ import annotations

from pathlib import Path

import pydicom


def misfile_series(hospital: Path, rows: list[dict[str, str]], series: int) -> set[str]:
    """File ``series`` second-visit series (every third, in UID order) under another patient
    of the hospital: PatientID and PatientName rewritten in the files and ``header_patient``
    in ``rows``. The misfiled series' UIDs."""
    second = [r for r in rows if r["visit"] == "2"]
    by_series: dict[str, list[dict[str, str]]] = {}
    for row in second:
        by_series.setdefault(row["series_instance_uid"], []).append(row)
    patients = sorted({r["true_patient"] for r in second})
    misfiled = set()
    for i, (uid, members) in enumerate(sorted(by_series.items())[: series * 3 : 3]):
        other = patients[(patients.index(members[0]["true_patient"]) + 1 + i) % len(patients)]
        donor = pydicom.dcmread(
            hospital / next(r["path"] for r in second if r["true_patient"] == other),
            stop_before_pixels=True,
        )
        for row in members:
            ds = pydicom.dcmread(hospital / row["path"])
            ds.PatientID, ds.PatientName = donor.PatientID, donor.PatientName
            ds.save_as(hospital / row["path"])
            row["header_patient"] = str(donor.PatientID)
        misfiled.add(uid)
    return misfiled
