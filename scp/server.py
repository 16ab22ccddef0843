"""The pynetdicom application entity and its thin event handlers."""

from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import A_RELEASE
from sqlalchemy.orm import Session, sessionmaker

from scp import pynetdicom_adapter
from scp.admission import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_DIAGNOSTICS,
    REJECT_LOCAL_LIMIT,
    admitted_associations,
    parse_allowed_peers,
    peer_allowed,
)
from scp.contexts import IMAGE_STORAGE_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_CLASS
from scp.filemeta import file_meta_header
from scp.ports import NoObserver, ScpObserver
from scp.records import Peer, StoreRequest
from scp.settings import ScpSettings
from scp.status import StoreStatus, error_comment, status_for
from scp.store import StoreService
from scp.tls import AuditedTLS, TLSFailure, server_context
from scp.transport import ConnectionGuard, GuardEvent, GuardLimits
from storage import audit
from storage.audit_trail import append_audit
from storage.instances import close_association, open_association
from storage.models import AssociationOutcome

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128


@dataclass
class _AssociationState:
    association_id: int | None
    peer: Peer
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes_stored: int = 0
    released: bool = False
    # study UID -> [patient ID, instances stored]
    studies: dict[str, list[Any]] = field(default_factory=dict)


class DicomServer:
    """Storage and Verification SCP. Handlers convert events to records and return statuses."""

    def __init__(
        self,
        *,
        settings: ScpSettings,
        store: StoreService,
        sessions: sessionmaker[Session],
        observer: ScpObserver | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.observer: ScpObserver = observer or NoObserver()
        self.allowed = parse_allowed_peers(settings.allowed_peers)
        self._associations: dict[int, _AssociationState] = {}
        self._closed_unaccepted: dict[int, weakref.ref[Any]] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._guard: ConnectionGuard | None = None
        # the guard's reports are written here, off the accept loop and the guard's watchdog
        self._guard_audit: ThreadPoolExecutor | None = None
        self.ae = self._make_ae()

    # ------------------------------------------------------------------ set-up

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        # pynetdicom counts every connection, its request come or not; we limit associations
        # whose request has come ourselves (_on_requested), and waiting connections by the guard
        ae.maximum_associations = (
            self.settings.max_associations + self.settings.max_pending_connections
        )
        ae.maximum_pdu_size = self.settings.max_pdu
        # a second past the guard's deadline for the request, so that the guard, which audits
        # a stalled request, is the one that ends it
        ae.acse_timeout = self.settings.acse_timeout_s + 1.0
        ae.dimse_timeout = self.settings.dimse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        # We check calling and called AE titles ourselves, to audit the reason.
        ae.require_called_aet = False
        ae.add_supported_context(VERIFICATION_CLASS)
        for sop_class_uid in IMAGE_STORAGE_CLASSES.values():
            ae.add_supported_context(sop_class_uid, list(TRANSFER_SYNTAXES))
        return ae

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
        ]

    def tls(self) -> AuditedTLS | None:
        """The TLS layer where a certificate is configured; None for plain TCP."""
        if not self.settings.tls_enabled:
            return None
        context = server_context(
            self.settings.tls_certificate,
            self.settings.tls_private_key,
            self.settings.tls_ca_certificates,
            require_client_certificate=self.settings.tls_require_client_certificate,
        )
        return AuditedTLS(
            context,
            handshake_timeout_s=self.settings.tls_handshake_timeout_s,
            on_failure=self._audit_tls_failure,
        )

    def start(self) -> None:
        pynetdicom_adapter.log_handler_level(
            narrated=logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
        )
        address = (self.settings.bind_address, self.settings.port)
        tls = self.tls()
        self._guard_audit = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medreid-guard")
        self._guard = ConnectionGuard(self.guard_limits(), on_event=self._on_guard_event, tls=tls)
        self._server = self.ae.start_server(
            address,
            block=False,
            evt_handlers=self.handlers(),
            ssl_context=self._guard,  # type: ignore[arg-type]  # duck-typed: wrap_socket only
        )
        # socketserver listens with a backlog of 5: a burst of connections past it waits a
        # second for the peer's retry before it is even seen. Listening again widens it.
        self._server.socket.listen(LISTEN_BACKLOG)
        log.info(
            "listening as %s on %s:%d%s",
            self.settings.ae_title,
            address[0],
            self.port,
            " (DICOM TLS)" if tls else "",
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def guard_limits(self) -> GuardLimits:
        settings = self.settings
        return GuardLimits(
            request_timeout_s=settings.acse_timeout_s,
            pdu_timeout_s=settings.network_timeout_s,
            max_pdu=settings.max_pdu,
            max_dataset_bytes=settings.max_dataset_mb * 1024 * 1024,
            max_pending=settings.max_pending_connections,
            max_pending_per_host=settings.max_pending_per_host,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self._guard_audit is not None:
            self._guard_audit.shutdown(wait=True)
            self._guard_audit = None

    # ------------------------------------------------------------------ audit

    def _audit(self, record: audit.AuditRecord) -> None:
        try:
            with self.sessions.begin() as session:
                append_audit(session, record=record)
        except Exception:
            log.exception("could not write audit event %s", record.kind.event_type)

    @staticmethod
    def _peer(event: Any) -> Peer:
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        calling = getattr(primitive, "calling_ae_title", None) or requestor.ae_title or ""
        called = getattr(primitive, "called_ae_title", None) or ""
        return Peer(
            calling_ae=str(calling).strip(),
            called_ae=str(called).strip(),
            host=str(requestor.address),
            port=int(requestor.port or 0),
        )

    # ------------------------------------------------------------------ association events

    def _on_conn_open(self, event: Any) -> None:
        if self._guard is not None:
            self._guard.attach(event.assoc)
        pynetdicom_adapter.prepare_association(event.assoc)

    def _on_requested(self, event: Any) -> None:
        if self._guard is not None:
            self._guard.admit(event.assoc)
        peer = self._peer(event)
        reason: str | None = None
        rejection: tuple[int, int, int] | None = None
        if not peer_allowed(self.allowed, peer.calling_ae, peer.host):
            reason, rejection = "calling AE title not recognised", REJECT_CALLING_AE
        elif self.settings.require_called_ae and peer.called_ae != self.settings.ae_title:
            reason, rejection = "called AE title not recognised", REJECT_CALLED_AE
        elif admitted_associations(self.ae) > self.settings.max_associations:
            reason, rejection = REJECT_DIAGNOSTICS[REJECT_LOCAL_LIMIT[1:]], REJECT_LOCAL_LIMIT
        if rejection is None:
            return
        # audited before the peer hears of it, so that the row is there once it has
        log.warning("rejected %s@%s: %s", peer.calling_ae, peer.host, reason)
        self._audit_rejection(peer, reason or "rejected")
        pynetdicom_adapter.reject(event.assoc, rejection)

    def _on_rejected(self, event: Any) -> None:
        # Rejections decided by pynetdicom itself (too many associations).
        primitive = event.assoc.acceptor.primitive
        key = (getattr(primitive, "result_source", 0), getattr(primitive, "diagnostic", 0))
        self._audit_rejection(self._peer(event), REJECT_DIAGNOSTICS.get(key, "rejected"))

    def _audit_tls_failure(self, failure: TLSFailure) -> None:
        self._audit(
            audit.AuditRecord(
                kind=audit.TLS_REFUSED,
                outcome=audit.Outcome.MINOR_FAILURE,
                actor_host=failure.host,
                detail={"reason": failure.reason, "port": failure.port},
            )
        )

    def _on_guard_event(self, event: GuardEvent) -> None:
        kind = audit.CONNECTION_REFUSED if event.refused_at_accept else audit.CONNECTION_DROPPED
        detail: dict[str, Any] = {"reason": event.reason}
        if event.refused_at_accept:
            detail["connections"] = event.count
        else:
            detail["port"] = event.port
        record = audit.AuditRecord(
            kind=kind,
            outcome=audit.Outcome.MINOR_FAILURE,
            actor_host=event.host,
            detail=detail,
        )
        try:
            if self._guard_audit is None:
                raise RuntimeError("stopped")
            self._guard_audit.submit(self._audit, record)
        except RuntimeError:  # shutting down
            log.warning("not audited (stopping): %s from %s", kind.event_type, event.host)

    def _audit_rejection(self, peer: Peer, reason: str) -> None:
        self.observer.association_rejected(peer.calling_ae, reason)
        self._audit(
            audit.AuditRecord(
                kind=audit.ASSOCIATION_REJECTED,
                outcome=audit.Outcome.MINOR_FAILURE,
                actor_ae=peer.calling_ae,
                actor_host=peer.host,
                detail={"reason": reason, "called_ae": peer.called_ae, "port": peer.port},
            )
        )

    def _on_accepted(self, event: Any) -> None:
        peer = self._peer(event)
        self.observer.association_accepted(peer.calling_ae)
        association_id: int | None = None
        try:
            with self.sessions.begin() as session:
                association_id = open_association(
                    session,
                    calling_ae=peer.calling_ae,
                    called_ae=peer.called_ae,
                    peer_host=peer.host,
                    peer_port=peer.port,
                )
                append_audit(
                    session,
                    record=audit.AuditRecord(
                        kind=audit.ASSOCIATION_ACCEPTED,
                        actor_ae=peer.calling_ae,
                        actor_host=peer.host,
                        detail={"association_id": association_id, "port": peer.port},
                    ),
                )
        except Exception:
            log.exception("could not record association from %s", peer.calling_ae)
        state = _AssociationState(association_id, peer)
        with self._lock:
            closed = self._closed_unaccepted.pop(id(event.assoc), None)
            closed_already = closed is not None and closed() is event.assoc
            if not closed_already:
                self._associations[id(event.assoc)] = state
        if closed_already:
            self._record_end(state)

    def _state(self, event: Any) -> _AssociationState | None:
        with self._lock:
            return self._associations.get(id(event.assoc))

    def _on_acse_sent(self, event: Any) -> None:
        # Released once our A-RELEASE response is queued for the peer: the peer may close the
        # connection as soon as it has it, and EVT_CONN_CLOSE (from the DUL thread) may then
        # come before EVT_RELEASED (from the association thread).
        primitive = event.primitive
        if isinstance(primitive, A_RELEASE) and primitive.result is not None:
            state = self._state(event)
            if state is not None:
                state.released = True

    def _on_conn_close(self, event: Any) -> None:
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
            if state is None:
                # Closed before (or while) the accepted handler ran: pynetdicom reads the
                # socket in another thread. The accepted handler finishes the record.
                if len(self._closed_unaccepted) > 1000:
                    self._closed_unaccepted = {
                        k: r for k, r in self._closed_unaccepted.items() if r() is not None
                    }
                self._closed_unaccepted[id(event.assoc)] = weakref.ref(event.assoc)
                return
        self._record_end(state)

    def _record_end(self, state: _AssociationState) -> None:
        outcome = AssociationOutcome.RELEASED if state.released else AssociationOutcome.ABORTED
        kind = audit.ASSOCIATION_RELEASED if state.released else audit.ASSOCIATION_ABORTED
        summary = {
            "association_id": state.association_id,
            "stored": state.stored,
            "duplicates": state.duplicates,
            "failed": state.failed,
            "bytes": state.bytes_stored,
        }
        try:
            with self.sessions.begin() as session:
                if state.association_id is not None:
                    close_association(
                        session,
                        association_id=state.association_id,
                        outcome=outcome,
                        stored=state.stored,
                        failed=state.failed,
                        bytes_stored=state.bytes_stored,
                        reason=None if state.released else "aborted before release",
                    )
                for study_uid, (patient_id, count) in state.studies.items():
                    append_audit(
                        session,
                        record=audit.AuditRecord(
                            kind=audit.INSTANCES_TRANSFERRED,
                            actor_ae=state.peer.calling_ae,
                            actor_host=state.peer.host,
                            patient_id=patient_id,
                            study_instance_uid=study_uid or None,
                            detail={
                                "association_id": state.association_id,
                                "instances": count,
                            },
                        ),
                    )
                append_audit(
                    session,
                    record=audit.AuditRecord(
                        kind=kind,
                        outcome=audit.Outcome.SUCCESS
                        if state.released
                        else audit.Outcome.MINOR_FAILURE,
                        actor_ae=state.peer.calling_ae,
                        actor_host=state.peer.host,
                        detail=summary,
                    ),
                )
        except Exception:
            log.exception("could not record the end of association %s", state.association_id)

    # ------------------------------------------------------------------ DIMSE services

    def _on_c_echo(self, event: Any) -> int:
        return int(StoreStatus.SUCCESS)

    def _on_c_store(self, event: Any) -> int | Dataset:
        state = self._state(event)
        peer = state.peer if state is not None else self._peer(event)
        request = event.request
        size_bytes = 0
        try:
            store_request = StoreRequest(
                association_key=id(event.assoc),
                peer=peer,
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                file_header=file_meta_header(
                    str(request.AffectedSOPClassUID or ""),
                    str(request.AffectedSOPInstanceUID or ""),
                    str(event.context.transfer_syntax),
                ),
                dataset=event.encoded_dataset(include_meta=False),
            )
            size_bytes = len(store_request.dataset)
            stored = self.store.store(
                store_request,
                association_id=state.association_id if state is not None else None,
            )
        except Exception as exc:
            status, reason = status_for(exc)
            if state is not None:
                state.failed += 1
            log.warning(
                "C-STORE from %s refused with 0x%04X: %s",
                peer.calling_ae,
                status,
                reason,
                extra={
                    "association": state.association_id if state is not None else None,
                    "sop_instance_uid": str(request.AffectedSOPInstanceUID or "")[:64],
                },
            )
            self._audit(
                audit.AuditRecord(
                    kind=audit.INSTANCE_REFUSED,
                    outcome=audit.Outcome.MINOR_FAILURE,
                    actor_ae=peer.calling_ae,
                    actor_host=peer.host,
                    detail={
                        "status": f"0x{int(status):04X}",
                        "reason": reason,
                        "sop_class_uid": str(request.AffectedSOPClassUID or "")[:64],
                        "sop_instance_uid": str(request.AffectedSOPInstanceUID or "")[:80],
                    },
                )
            )
            self.observer.store_answered(peer.calling_ae, int(status), size_bytes)
            response = Dataset()
            response.Status = int(status)
            response.ErrorComment = error_comment(reason)
            return response
        self.observer.store_answered(peer.calling_ae, int(StoreStatus.SUCCESS), size_bytes)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "C-STORE from %s stored%s",
                peer.calling_ae,
                " (a duplicate)" if stored.duplicate else "",
                extra={
                    "association": state.association_id if state is not None else None,
                    "sop_instance_uid": store_request.sop_instance_uid,
                },
            )
        if state is not None:
            if stored.duplicate:
                state.duplicates += 1
            else:
                state.stored += 1
                state.bytes_stored += stored.size_bytes
                study = state.studies.setdefault(
                    stored.study_instance_uid or "", [stored.patient_id, 0]
                )
                study[1] += 1
        return int(StoreStatus.SUCCESS)
