"""Frozen records made from pynetdicom events at the edge."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    calling_ae: str
    called_ae: str
    host: str
    port: int


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE as received: the dataset bytes exactly as the peer encoded them."""

    association_key: int
    peer: Peer
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    file_header: bytes  # preamble, "DICM" and the encoded file meta information
    dataset: bytes


@dataclass(frozen=True)
class StoredInstance:
    """What a successful store recorded, for the association's summary."""

    instance_id: int | None  # None for an identical re-send that was not duplicated
    version: int
    duplicate: bool
    patient_id: str | None
    study_instance_uid: str | None
    size_bytes: int
