"""The settings of the PACS priors: which nodes to ask for a patient's earlier images, how,
and within what limits. Read with the rest by ``medreid.settings``, which reports a
ValueError here as a SettingsError naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from medreid.outbox_settings import parse_destination
from scp.settings import check_range


class Retrieval(StrEnum):
    GET = "get"  # C-GET: the images come back on our own association; the PACS needs no route
    MOVE = "move"  # C-MOVE to move_ae, which the PACS must know as host:move_port
    WADO = "wado-rs"  # DICOMweb: QIDO-RS to search, WADO-RS to fetch (a node given as a URL)


@dataclass(frozen=True)
class PacsNode:
    ae_title: str
    host: str
    port: int
    retrieval: Retrieval
    url: str = ""  # a DICOMweb node's base URL (its QIDO-RS and WADO-RS root)

    @property
    def name(self) -> str:
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"


def parse_node(text: str, default: Retrieval) -> PacsNode:
    """``AE@host:port``, optionally followed by ``get`` or ``move``; or a DICOMweb base URL,
    ``http(s)://host:port/dicom-web``."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        url = urlsplit(text)
        if not url.hostname or " " in text:
            raise ValueError(f"{text!r} is not a DICOMweb base URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        return PacsNode("", url.hostname, port, Retrieval.WADO, url=text.rstrip("/"))
    address, _, method = text.partition(" ")
    ae, host, port = parse_destination(address)
    method = method.strip().lower() or default
    if method not in (Retrieval.GET, Retrieval.MOVE):
        raise ValueError(f"{text!r}: retrieval {method!r} is not get or move")
    return PacsNode(ae, host, port, Retrieval(method))


@dataclass(frozen=True)
class PriorsSettings:
    """Where an image's header patient has too few gallery entries under the serving model,
    the worker asks these PACS nodes for the patient's earlier studies of the modality
    (Study Root C-FIND), fetches a few images of each (C-GET, or C-MOVE to ``move_ae``),
    embeds them as received images are and keeps them as the patient's references. Off while
    ``nodes`` is empty."""

    # "AE@host:port", optionally "AE@host:port move"; or "https://host/dicom-web" (DICOMweb)
    nodes: tuple[str, ...] = ()
    calling_ae: str = "MEDREID"
    retrieval: str = Retrieval.GET  # for nodes that do not name theirs
    # C-MOVE's destination: this AE title, listening on move_port while a move runs (the
    # PACS must know it as this host and port)
    move_ae: str = "MEDREID_PRIORS"
    move_port: int = 11113
    # What one patient's priors of one modality may take from the PACS: the newest
    # max_studies studies of the last years_back years, at most series_per_study series of
    # each and images_per_series images of each series (spread over the series).
    max_studies: int = 3
    series_per_study: int = 2
    images_per_series: int = 3
    years_back: float = 10.0
    # Ask the PACS when the patient has fewer entries than this under the serving model, or
    # when the last answer is older than fresh_days (then only what is not held is fetched).
    min_entries: int = 1
    fresh_days: float = 30.0
    # each DIMSE exchange; and all the asking and fetching for one image's priors
    timeout_s: float = 10.0
    budget_s: float = 30.0
    # associations open to the PACS at once from this host's workers
    max_concurrent: int = 2
    # priors that could not be had are asked for again after retry_s, doubling up to
    # retry_max_s, max_attempts times; the images waiting for them are judged then
    retry_s: float = 60.0
    retry_max_s: float = 3600.0
    max_attempts: int = 10

    @property
    def enabled(self) -> bool:
        return bool(self.nodes)

    def pacs_nodes(self) -> list[PacsNode]:
        return [parse_node(node, Retrieval(self.retrieval)) for node in self.nodes]

    def validate(self) -> None:
        if self.retrieval not in (Retrieval.GET, Retrieval.MOVE):
            raise ValueError(f"priors.retrieval: {self.retrieval!r} is not get or move")
        for node in self.nodes:
            try:
                parse_node(node, Retrieval(self.retrieval))
            except ValueError as exc:
                raise ValueError(f"priors.nodes: {exc}") from None
        for key in ("calling_ae", "move_ae"):
            if not 1 <= len(getattr(self, key).strip()) <= 16:
                raise ValueError(f"priors.{key}: 1 to 16 characters")
        check_range("priors.move_port", self.move_port, 1, 65535)
        check_range("priors.max_studies", self.max_studies, 1, 100)
        check_range("priors.series_per_study", self.series_per_study, 1, 100)
        check_range("priors.images_per_series", self.images_per_series, 1, 100)
        check_range("priors.years_back", self.years_back, 0.1, 200.0)
        check_range("priors.min_entries", self.min_entries, 1, 1000)
        check_range("priors.fresh_days", self.fresh_days, 0.0, 36500.0)
        check_range("priors.timeout_s", self.timeout_s, 0.5, 600.0)
        check_range("priors.budget_s", self.budget_s, 1.0, 3600.0)
        check_range("priors.max_concurrent", self.max_concurrent, 1, 64)
        check_range("priors.retry_s", self.retry_s, 0.1, 86400.0)
        check_range("priors.retry_max_s", self.retry_max_s, 0.1, 7 * 86400.0)
        check_range("priors.max_attempts", self.max_attempts, 1, 1000)
