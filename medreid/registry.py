"""The pipeline's model registry (pipeline.ports.ModelRegistry) over the service's database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from storage.gallery import active_models, gallery_after


class SqlRegistryView:
    def __init__(self, session: Session) -> None:
        self.session = session

    def active_models(self) -> dict[str, tuple[str, str]]:
        return active_models(self.session)

    def gallery_after(self, *, model_version: str, after_id: int) -> list[tuple[int, str, bytes]]:
        return gallery_after(self.session, model_version=model_version, after_id=after_id)


class SqlModelRegistry:
    """Each view is one transaction, so the models and the gallery are read consistently."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    @contextmanager
    def view(self) -> Iterator[SqlRegistryView]:
        with self.sessions.begin() as session:
            yield SqlRegistryView(session)
