"""PACS priors as the reference for "is this really patient P?": on demand for the worker,
ahead of time for `medreid priors backfill`.

For one patient and modality under the serving model: ask each PACS node for the patient's
earlier studies (leaving out the study being checked), fetch a few images of each, decode,
CLAHE and embed them exactly as received images are, and keep them as gallery entries
marked as PACS priors (their references, not their pixels). What the PACS was asked, and
with what outcome, is one row per patient, modality and model: a lease while a worker asks,
a retry schedule while it cannot."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from medreid.dicomweb import DicomWebClient
from medreid.pacs import (
    DimseClient,
    Exchange,
    PacsClient,
    PacsUnavailable,
    PriorImage,
    choose_priors,
    patients_of,
)
from medreid.priors_settings import PriorsSettings, Retrieval
from pipeline.analysis import Embedder
from pipeline.modelstore import embedding_bytes
from pipeline.runner import PipelineConfig, run_dataset
from storage import audit
from storage.audit_trail import append_audit
from storage.gallery import NewGalleryEntry, PriorReference, add_gallery_entries
from storage.models import PriorFetchState, utcnow
from storage.priors import (
    PriorsKey,
    fetch_failed,
    fetch_succeeded,
    held_prior_uids,
    prior_studies,
    priors_held,
    take_fetch_lease,
)

log = logging.getLogger(__name__)

UNAVAILABLE = "priors unavailable"


class EmbedderSource(Protocol):
    """The serving re-identification models (the worker's Analyser)."""

    def refresh(self) -> None: ...

    def embedder(self, modality: str) -> Embedder | None: ...


@dataclass(frozen=True)
class PriorsWanted:
    """One image's need: its header patient's priors of its modality, without its study."""

    patient_id: str
    modality: str
    study_instance_uid: str | None


@dataclass(frozen=True)
class PriorsCheck:
    """What the priors gave: held (perhaps none: the PACS has nothing earlier), or not to be
    had now (``reason``); ``wait``: the image is judged again when they can be had."""

    available: bool
    studies: list[dict[str, object]] = field(default_factory=list)
    reason: str | None = None
    wait: bool = False
    modality: str = ""  # the modality whose priors these are

    def applies_to(self, routed_to: str | None) -> bool:
        """Whether an image routed to ``routed_to`` is judged by these priors (not where the
        pixels sent it to another modality's model than its header's)."""
        return not self.modality or routed_to == self.modality


@dataclass(frozen=True)
class FetchOutcome:
    studies: int
    stored: int
    error: str | None  # None: the PACS answered
    state: PriorFetchState  # what the fetch row says now: fetched, unavailable or gave_up


class PriorsFetcher:
    """Fetches priors within the settings' limits and budget, for any caller."""

    def __init__(
        self,
        settings: PriorsSettings,
        sessions: sessionmaker[Session],
        models: EmbedderSource,
        config: PipelineConfig,
        tag_map: Mapping[str, str],
        *,
        lock_folder: Path,
        name: str,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.models = models
        self.config = config
        self.tag_map = tag_map
        self.name = name
        self.clock = clock
        # a node that failed is not asked again for retry_s (monotonic time, why), so a PACS
        # that is down costs one timeout, not one per patient
        self._down: dict[str, tuple[float, str]] = {}
        self.clients: list[PacsClient] = [
            DicomWebClient(n, settings, lock_folder)
            if n.retrieval == Retrieval.WADO
            else DimseClient(n, settings, lock_folder)
            for n in settings.pacs_nodes()
        ]

    def codes_of(self, modality: str) -> set[str]:
        """The header Modality codes of a model modality, by the tag map."""
        return {code for code, m in self.tag_map.items() if m == modality}

    def key(self, patient_id: str, modality: str) -> PriorsKey | None:
        embedder = self.models.embedder(modality)
        if embedder is None:
            return None
        return PriorsKey(patient_id, modality, embedder.version)

    # ------------------------------------------------------------------ on demand

    def check(self, wanted: list[PriorsWanted]) -> dict[PriorsWanted, PriorsCheck]:
        """Make sure each patient's priors are held (fetching what is missing, one fetch per
        patient and modality, leaving out the studies being checked), within budget_s each."""
        studies: dict[tuple[str, str], set[str]] = {}
        for want in wanted:
            pair = (want.patient_id, want.modality)
            studies.setdefault(pair, set()).update(
                [want.study_instance_uid] if want.study_instance_uid else []
            )
        done = {
            pair: dataclasses.replace(self._check_one(*pair, exclude), modality=pair[1])
            for pair, exclude in studies.items()
        }
        return {want: done[(want.patient_id, want.modality)] for want in wanted}

    def _needs_fetch(self, key: PriorsKey) -> tuple[bool, PriorsCheck | None]:
        """Whether to ask the PACS now; where not, what the priors held give."""
        s = self.settings
        now = self.clock()
        with self.sessions.begin() as session:
            held = priors_held(session, key=key)
            studies = prior_studies(
                session, patient_id=key.patient_id, model_version=key.model_version
            )
        if (
            held.state == PriorFetchState.UNAVAILABLE
            and held.next_attempt_at
            and held.next_attempt_at > now
        ):
            # asked recently, in vain: not again for every image of the series
            return False, PriorsCheck(False, reason=f"{UNAVAILABLE}: {held.last_error}", wait=True)
        if held.state == PriorFetchState.GAVE_UP:
            return False, PriorsCheck(
                False, reason=f"{UNAVAILABLE} (given up): {held.last_error}", wait=False
            )
        fresh = (
            held.state == PriorFetchState.FETCHED
            and held.fetched_at is not None
            and now - held.fetched_at < dt.timedelta(days=s.fresh_days)
        )
        if fresh or (held.state is None and held.entries >= s.min_entries):
            return False, PriorsCheck(True, studies=studies)
        return True, None  # never asked, or asked long ago: only what is new is fetched

    def _check_one(self, patient_id: str, modality: str, exclude: set[str]) -> PriorsCheck:
        key = self.key(patient_id, modality)
        if key is None:
            return PriorsCheck(True)  # no model serves the modality: nothing to judge with
        fetch, answer = self._needs_fetch(key)
        if not fetch:
            assert answer is not None
            return answer
        deadline = time.monotonic() + self.settings.budget_s
        outcome = self.fetch(key, exclude_studies=exclude, deadline=deadline)
        if outcome is None:
            # another worker is asking the PACS: wait for its answer within the budget
            while time.monotonic() < deadline:
                time.sleep(0.2)
                with self.sessions.begin() as session:
                    state = priors_held(session, key=key).state
                if state != PriorFetchState.FETCHING:
                    fetch, answer = self._needs_fetch(key)
                    if answer is not None:
                        return answer
                    break
            return PriorsCheck(
                False, reason=f"{UNAVAILABLE}: another worker is still fetching them", wait=True
            )
        if outcome.error is not None:
            return PriorsCheck(False, reason=f"{UNAVAILABLE}: {outcome.error}", wait=True)
        with self.sessions.begin() as session:
            studies = prior_studies(
                session, patient_id=key.patient_id, model_version=key.model_version
            )
        return PriorsCheck(True, studies=studies)

    # ------------------------------------------------------------------ fetching

    def fetch(
        self,
        key: PriorsKey,
        *,
        exclude_studies: set[str],
        deadline: float,
        since: dt.date | None = None,
        until: dt.date | None = None,
    ) -> FetchOutcome | None:
        """Ask every node for the patient's priors and keep what is not held. None where
        another worker holds the lease (it is asking now)."""
        s = self.settings
        with self.sessions.begin() as session:
            if not take_fetch_lease(session, key=key, lease_s=s.budget_s + s.timeout_s):
                return None
            held = held_prior_uids(
                session, patient_id=key.patient_id, model_version=key.model_version
            )
        today = self.clock().date()
        start = since or today - dt.timedelta(days=round(365.25 * s.years_back))
        dates = f"{start:%Y%m%d}-{until:%Y%m%d}" if until else f"{start:%Y%m%d}-"
        codes = self.codes_of(key.modality)
        entries: list[NewGalleryEntry] = []
        records: list[audit.AuditRecord] = []
        errors: list[str] = []
        studies: set[str] = set()
        for client in self.clients:
            exchange = Exchange(client.node.name, method=_method(client.node.retrieval))
            down = self._down.get(client.node.name)
            if down is not None and time.monotonic() < down[0]:
                errors.append(down[1])
                continue
            error: str | None = None
            try:
                with client.search(deadline) as search:
                    found = choose_priors(
                        search,
                        s,
                        patient_id=key.patient_id,
                        modality_codes=codes,
                        exclude_studies=exclude_studies,
                        dates=dates,
                        held=held,
                        exchange=exchange,
                    )
                studies |= {f.study_instance_uid for f in found}
                datasets = client.retrieve(found, deadline=deadline, exchange=exchange)
                entries += self._embed(key, found, datasets)
                held |= {f.sop_instance_uid for f in found}
                self._down.pop(client.node.name, None)
            except PacsUnavailable as exc:
                error = exc.reason
                log.warning("priors of a patient from %s: %s", client.node.name, exc.reason)
                self._down[client.node.name] = (time.monotonic() + s.retry_s, exc.reason)
            except Exception as exc:  # a bug or a PACS answer nothing foresaw: not a crash
                log.exception("priors from %s failed", client.node.name)
                error = f"{client.node.name}: {type(exc).__name__}: {exc}"
            if error is not None:
                errors.append(error)
            records.append(self._query_record(key, exchange, error))
            if exchange.requested:
                records.append(self._transfer_record(key, exchange))
        answered = len(errors) < len(self.clients)
        with self.sessions.begin() as session:
            if entries:
                add_gallery_entries(session, entries=entries)
            for record in records:
                append_audit(session, record=record)
            if answered:
                fetch_succeeded(session, key=key, studies=len(studies), images=len(entries))
                state = PriorFetchState.FETCHED
            else:
                state = fetch_failed(
                    session,
                    key=key,
                    error="; ".join(errors),
                    retry_s=s.retry_s,
                    retry_max_s=s.retry_max_s,
                    max_attempts=s.max_attempts,
                )
        error = None if answered else "; ".join(errors)
        return FetchOutcome(len(studies), len(entries), error, state)

    def fetch_again(self, key: PriorsKey, images: list[PriorImage]) -> tuple[int, int]:
        """Known priors (their references) fetched again, without a query, and kept under
        ``key``'s model: for a new model version. Returns (kept, not to be had)."""
        entries: list[NewGalleryEntry] = []
        records: list[audit.AuditRecord] = []
        missing = 0
        for client in self.clients:
            mine = [i for i in images if i.node == client.node.name]
            if not mine:
                continue
            exchange = Exchange(client.node.name, method=_method(client.node.retrieval))
            try:
                datasets = client.retrieve(
                    mine, deadline=time.monotonic() + self.settings.budget_s, exchange=exchange
                )
                kept = self._embed(key, mine, datasets)
                entries += kept
                missing += len(mine) - len(kept)
            except PacsUnavailable:
                missing += len(mine)
            if exchange.requested:
                records.append(self._transfer_record(key, exchange))
        nodes = {c.node.name for c in self.clients}
        missing += sum(i.node not in nodes for i in images)  # a node no longer configured
        with self.sessions.begin() as session:
            if entries:
                add_gallery_entries(session, entries=entries)
            for record in records:
                append_audit(session, record=record)
        return len(entries), missing

    def _embed(
        self, key: PriorsKey, found: list[PriorImage], datasets: list[Dataset]
    ) -> list[NewGalleryEntry]:
        """The fetched images decoded, CLAHE'd and embedded as received images are; those
        that are not the patient's asked-for images, or cannot be decoded, are left out."""
        embedder = self.models.embedder(key.modality)
        if embedder is None or embedder.version != key.model_version:
            return []  # the model changed meanwhile: these would not be comparable
        asked = {f.sop_instance_uid: f for f in found}
        images, refs = [], []
        for ds in datasets:
            ref = asked.get(str(getattr(ds, "SOPInstanceUID", "")))
            if ref is None or str(getattr(ds, "PatientID", "")) != key.patient_id:
                log.warning("priors: the PACS sent an image not asked for; left out")
                continue
            result = run_dataset(ds, self.config)
            if result.enhanced is None:
                log.warning("priors: a prior could not be decoded: %s", result.failure_reason)
                continue
            images.append(result.enhanced[0])
            refs.append(ref)
        if not images:
            return []
        vectors = embedder.embed(images)
        return [
            NewGalleryEntry(
                patient_id=key.patient_id,
                modality=key.modality,
                model_version=key.model_version,
                embedding=embedding_bytes(vector),
                source_instance_id=None,
                source_path=None,
                enrolled_by=self.name,
                prior=PriorReference(
                    node=ref.node,
                    study_instance_uid=ref.study_instance_uid,
                    series_instance_uid=ref.series_instance_uid,
                    sop_instance_uid=ref.sop_instance_uid,
                    study_date=ref.study_date,
                ),
            )
            for ref, vector in zip(refs, vectors, strict=True)
        ]

    def _query_record(
        self, key: PriorsKey, exchange: Exchange, error: str | None
    ) -> audit.AuditRecord:
        """A node asked for a patient's priors (Query), with why it failed where it did."""
        return audit.AuditRecord(
            kind=audit.QUERY,
            outcome=audit.Outcome.SUCCESS if error is None else audit.Outcome.SERIOUS_FAILURE,
            actor_user=self.name,
            actor_ae=self.settings.calling_ae,
            patient_id=key.patient_id,
            detail={
                "purpose": "priors",
                "node": exchange.node,
                "query": "QIDO-RS" if exchange.method == "WADO-RS" else "Study Root C-FIND",
                "modality": key.modality,
                "queries": [{"level": lvl, "matches": n} for lvl, n in exchange.queries],
                **({"reason": error} if error is not None else {}),
            },
        )

    def _transfer_record(self, key: PriorsKey, exchange: Exchange) -> audit.AuditRecord:
        """Images retrieved from a node (DICOM Instances Transferred), with the counts."""
        return audit.AuditRecord(
            kind=audit.INSTANCES_TRANSFERRED,
            outcome=audit.Outcome.SUCCESS
            if exchange.received == exchange.requested
            else audit.Outcome.MINOR_FAILURE,
            actor_user=self.name,
            actor_ae=self.settings.calling_ae,
            patient_id=key.patient_id,
            detail={
                "purpose": "priors",
                "node": exchange.node,
                "method": exchange.method,
                "requested": exchange.requested,
                "received": exchange.received,
                "failed": exchange.failed,
            },
        )


def _method(retrieval: Retrieval) -> str:
    return {Retrieval.GET: "C-GET", Retrieval.MOVE: "C-MOVE", Retrieval.WADO: "WADO-RS"}[retrieval]


@dataclass
class BackfillReport:
    patients: int = 0
    images: int = 0  # gallery entries added
    unavailable: list[str] = field(default_factory=list)  # "patient/modality: why"


def backfill_patients(
    fetcher: PriorsFetcher, *, since: dt.date, until: dt.date, modalities: list[str]
) -> set[str]:
    """The patients the PACS nodes hold a study of these modalities for, in the window."""
    codes = set().union(*(fetcher.codes_of(m) for m in modalities))
    patients: set[str] = set()
    window = f"{since.strftime('%Y%m%d')}-{until.strftime('%Y%m%d')}"
    for client in fetcher.clients:
        with client.search(time.monotonic() + max(fetcher.settings.budget_s, 60.0)) as search:
            patients |= patients_of(search.studies("", window), codes)
    return patients


def backfill(
    fetcher: PriorsFetcher,
    *,
    patients: list[str],
    modalities: list[str],
    since: dt.date,
    until: dt.date,
    progress: Callable[[int, int], None] | None = None,
) -> BackfillReport:
    """Fill the gallery with each patient's studies of the window, ahead of the images that
    will need them. What is held already is not fetched again, so an interrupted backfill
    is resumed by running it again."""
    report = BackfillReport()
    work = [(p, m) for p in patients for m in modalities]
    for done, (patient_id, modality) in enumerate(work, start=1):
        key = fetcher.key(patient_id, modality)
        if key is not None:
            outcome = fetcher.fetch(
                key,
                exclude_studies=set(),
                deadline=time.monotonic() + fetcher.settings.budget_s,
                since=since,
                until=until,
            )
            if outcome is None:
                report.unavailable.append(f"{patient_id}/{modality}: being fetched by a worker")
            elif outcome.error is not None:
                report.unavailable.append(f"{patient_id}/{modality}: {outcome.error}")
            else:
                report.images += outcome.stored
        if progress is not None:
            progress(done, len(work))
    report.patients = len(patients)
    return report
