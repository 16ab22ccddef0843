"""What the service's processes and commands build alike: the database, the pipeline's
configuration, the acting OS user."""

from __future__ import annotations

import getpass
import os

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from medreid.priors import EmbedderSource, PriorsFetcher
from medreid.settings import Settings
from pipeline.clahe import ClaheParams
from pipeline.decode import DecodeParams
from pipeline.runner import PipelineConfig
from storage.db import make_engine, make_sessionmaker


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


def pipeline_config(settings: Settings) -> PipelineConfig:
    tile = settings.clahe.tile_grid
    return PipelineConfig(
        decode=DecodeParams(
            frames=settings.decode.frames,
            max_frames=settings.decode.max_frames,
            max_bytes=settings.scp.max_dataset_mb * 1024 * 1024,
        ),
        clahe=ClaheParams(clip_limit=settings.clahe.clip_limit, tile_grid=(tile[0], tile[1])),
    )


def build_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(settings.database.url, busy_timeout_s=settings.database.busy_timeout_s)
    return engine, make_sessionmaker(engine)


def build_priors(
    settings: Settings,
    sessions: sessionmaker[Session],
    models: EmbedderSource | None,
    name: str,
) -> PriorsFetcher | None:
    """The PACS priors fetcher, where PACS nodes are configured and models serve."""
    if not settings.priors.enabled or models is None:
        return None
    return PriorsFetcher(
        settings.priors,
        sessions,
        models,
        pipeline_config(settings),
        settings.analysis.tag_mapping(),
        # the lock files that bound this host's associations to the PACS
        lock_folder=settings.spool.dir.resolve() / ".priors",
        name=name,
    )
