"""The SOP classes and transfer syntaxes the SCP accepts."""

from __future__ import annotations

from pydicom import uid
from pynetdicom import AllStoragePresentationContexts

# Storage SOP classes whose instances carry an image (pixel data a person would look at),
# plus the pixel-bearing derived objects a PACS forwards with them.
_EXTRA_PIXEL_CLASSES = (
    "EnhancedUSVolumeStorage",
    "SegmentationStorage",
    "ParametricMapStorage",
    "RTDoseStorage",
)

IMAGE_STORAGE_CLASSES: dict[str, str] = {
    keyword: str(context.abstract_syntax)
    for context in AllStoragePresentationContexts
    if (keyword := uid.UID(str(context.abstract_syntax)).keyword)
    and ("Image" in keyword or keyword in _EXTRA_PIXEL_CLASSES)
}

TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)

VERIFICATION_CLASS = "1.2.840.10008.1.1"
