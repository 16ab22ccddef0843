"""The pydicom and pydicom-data test corpora, found on disk (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pydicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def corpus_dirs() -> list[Path]:
    dirs = [PYDICOM_FILES]
    try:
        import data_store  # the pydicom-data package

        dirs.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return dirs


def corpus_file(name: str) -> Path:
    for directory in corpus_dirs():
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(name)


def corpus_files() -> list[Path]:
    return [p for d in corpus_dirs() for p in sorted(d.rglob("*")) if p.is_file()]
