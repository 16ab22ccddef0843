"""What the receiver tells the outside about its work, as it happens (metrics, for one)."""

from __future__ import annotations

from typing import Protocol


class ScpObserver(Protocol):
    """Called on the association's thread: must be quick and must not raise."""

    def association_accepted(self, calling_ae: str) -> None: ...

    def association_rejected(self, calling_ae: str, reason: str) -> None: ...

    def store_answered(self, calling_ae: str, status: int, size_bytes: int) -> None:
        """A C-STORE answered with ``status``; ``size_bytes`` of dataset received."""


class NoObserver:
    def association_accepted(self, calling_ae: str) -> None:
        pass

    def association_rejected(self, calling_ae: str, reason: str) -> None:
        pass

    def store_answered(self, calling_ae: str, status: int, size_bytes: int) -> None:
        pass
