"""What the pipeline's worker tells the outside about its work (metrics, for one)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol


class ModelRegistryView(Protocol):
    """One consistent look at which models serve and at the enrolled gallery."""

    def active_models(self) -> dict[str, tuple[str, str]]:
        """slot -> (version, folder) of the activated models."""

    def gallery_after(self, *, model_version: str, after_id: int) -> list[tuple[int, str, bytes]]:
        """Entries of one model version newer than ``after_id``: (id, patient, embedding)."""


class ModelRegistry(Protocol):
    """Where the activated models and the gallery are kept (the database, for the service)."""

    def view(self) -> AbstractContextManager[ModelRegistryView]: ...


class WorkerObserver(Protocol):
    """Called on the worker's thread: must be quick and must not raise."""

    def job_finished(
        self,
        *,
        timings_ms: Mapping[str, float],
        ok: bool,
        modality: str | None,
        identity_verdict: str | None,
    ) -> None:
        """A job's result was stored: its stage durations (read, decode, clahe, models),
        whether the pipeline succeeded, the modality it was routed by and its identity
        verdict (None where there was no analysis)."""

    def database_error(self) -> None: ...


class NoObserver:
    def job_finished(
        self,
        *,
        timings_ms: Mapping[str, float],
        ok: bool,
        modality: str | None,
        identity_verdict: str | None,
    ) -> None:
        pass

    def database_error(self) -> None:
        pass
