"""medreid: a DICOM receiver that checks pixels against headers."""

__version__ = "0.1.0"
