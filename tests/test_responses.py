"""C-STORE responses encoded directly: the bytes pynetdicom would send, and its way otherwise."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from scp.pynetdicom_adapter import c_store_rsp_command, respond_directly
from scp.server import DicomServer
from scp.status import StoreStatus
from support.dicom_factory import encode
from tests.conftest import ServerFactory
from tests.test_scp import associate, ct

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def response(
    status: int = 0x0000,
    message_id: int = 7,
    sop_class_uid: str = CT_IMAGE,
    sop_instance_uid: str = "1.2.3.4",
) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class_uid
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Status = status
    return primitive


def pynetdicoms_pdata(primitive: C_STORE, context_id: int, max_pdu: int) -> list[Any]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(context_id, max_pdu)]


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC211, 0xFFFF])
@pytest.mark.parametrize("message_id", [1, 0x1234, 0xFFFF])
@pytest.mark.parametrize(
    "sop_instance_uid",
    ["1.2.3.4", "1.2.3.45", "2.25.329800735698586629295641978511506172918", "1" * 64],
)
def test_a_plain_response_is_what_pynetdicom_would_send(
    status: int, message_id: int, sop_instance_uid: str
) -> None:
    primitive = response(status, message_id, sop_instance_uid=sop_instance_uid)
    command = c_store_rsp_command(
        message_id=message_id,
        sop_class_uid=CT_IMAGE,
        sop_instance_uid=sop_instance_uid,
        status=status,
    )
    assert pynetdicoms_pdata(primitive, 3, 16382) == [[(3, b"\x03" + command)]]


class FakeAssociation:
    """What respond_directly uses of an association: its DIMSE provider, DUL and handlers."""

    def __init__(self, max_pdu: int = 16382, listening: bool = False) -> None:
        self.sent_by_pynetdicom: list[Any] = []
        self.queued: list[P_DATA] = []
        self.listening = listening
        self.dimse = type("Dimse", (), {})()
        self.dimse.maximum_pdu_size = max_pdu
        self.dimse.send_msg = lambda primitive, cx: self.sent_by_pynetdicom.append(primitive)
        self.dul = type("Dul", (), {})()
        self.dul.send_pdu = self.queued.append

    def get_handlers(self, event: Any) -> Any:
        return [(print, None)] if self.listening and event == evt.EVT_DIMSE_SENT else []


def test_a_plain_response_is_queued_as_one_pdata() -> None:
    assoc = FakeAssociation()
    respond_directly(assoc)
    primitive = response()
    assoc.dimse.send_msg(primitive, 5)
    assert assoc.sent_by_pynetdicom == []
    assert [p.presentation_data_value_list for p in assoc.queued] == pynetdicoms_pdata(
        primitive, 5, 16382
    )


def with_comment() -> C_STORE:
    primitive = response(0xA700)
    primitive.ErrorComment = "spool disk below its free-space watermark"  # type: ignore[assignment]
    return primitive


def with_offending_element() -> C_STORE:
    primitive = response(0xA900)
    primitive.OffendingElement = [0x00080018]  # type: ignore[assignment]
    return primitive


def request() -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(b"\x08\x00\x18\x00")
    return primitive


def echo_response() -> C_ECHO:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0
    return primitive


@pytest.mark.parametrize(
    ("make", "assoc"),
    [
        (with_comment, FakeAssociation()),
        (with_offending_element, FakeAssociation()),
        (request, FakeAssociation()),
        (echo_response, FakeAssociation()),
        (response, FakeAssociation(listening=True)),  # someone wants pynetdicom's message
        (response, FakeAssociation(max_pdu=64)),  # would need more than one fragment
    ],
)
def test_anything_else_goes_pynetdicoms_way(make: Any, assoc: FakeAssociation) -> None:
    respond_directly(assoc)
    primitive = make()
    assoc.dimse.send_msg(primitive, 1)
    assert assoc.sent_by_pynetdicom == [primitive]
    assert assoc.queued == []


def test_our_server_answers_a_store_directly_and_a_refusal_as_pynetdicom_does(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built: list[C_STORE] = []
    to_message = C_STORE_RSP.primitive_to_message

    def counted(self: C_STORE_RSP, primitive: C_STORE) -> None:
        built.append(primitive)
        to_message(self, primitive)

    monkeypatch.setattr(C_STORE_RSP, "primitive_to_message", counted)
    server: DicomServer = make_server()
    received: list[Dataset] = []
    assoc = associate(server, syntaxes=(ExplicitVRLittleEndian,))
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: received.append(event.message.command_set))
    good = ct(generate_uid())
    assert int(assoc.send_c_store(good).Status) == StoreStatus.SUCCESS
    # a file whose meta (which becomes the command) names another instance than its dataset
    bad = ct(generate_uid())
    uid = bad.SOPInstanceUID.encode()
    other = uid[:-1] + (b"2" if uid[-1:] != b"2" else b"3")
    contradicting = tmp_path / "contradicting.dcm"
    contradicting.write_bytes(encode(bad).replace(uid, other, 1))
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as they are
    refused = assoc.send_c_store(contradicting)
    assoc.release()

    # the sender decoded both; only the refusal, with its comment, was built by pynetdicom
    answer = received[0]
    assert answer.Status == StoreStatus.SUCCESS
    assert answer.MessageIDBeingRespondedTo == 1
    assert answer.AffectedSOPInstanceUID == good.SOPInstanceUID
    assert answer.AffectedSOPClassUID == good.SOPClassUID
    assert answer.CommandDataSetType == 0x0101
    assert refused.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert received[1].ErrorComment == refused.ErrorComment
    assert [p.Status for p in built] == [StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS]
