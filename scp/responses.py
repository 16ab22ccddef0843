"""C-STORE responses encoded as bytes, not through pydicom datasets.

pynetdicom sends every response by building a DIMSE message from the primitive: a pydicom
dataset of the command set, its values validated and set one by one, encoded twice (once to
learn the group length). For a plain C-STORE response (a status, no error comment or
offending element) that was a fifth of the time our server held the GIL while receiving CT
images. For our associations such a response is built directly from its seven elements; the
bytes are those pynetdicom would send (the tests compare them), and any other message, or
any association where something listens for sent messages, goes pynetdicom's way.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from scp.filemeta import padded

_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
# Message Control Header of a command's last (here: only) fragment, PS3.8 E.2
_LAST_COMMAND_FRAGMENT = b"\x03"


def _element(element: int, value: bytes) -> bytes:
    """An element of group 0000 (Implicit VR Little Endian, as every command set)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def c_store_rsp_command(
    *, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The encoded command set of a C-STORE response with no optional elements."""
    body = b"".join(
        (
            _element(0x0002, padded(sop_class_uid, b"\x00")),
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATASET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, padded(sop_instance_uid, b"\x00")),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _plain_c_store_rsp(primitive: Any) -> bool:
    return (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
    )


def respond_directly(assoc: Any) -> None:
    """Send this association's plain C-STORE responses as directly encoded bytes. Call
    before its threads start (pynetdicom's EVT_CONN_OPEN)."""
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _plain_c_store_rsp(primitive) or assoc.get_handlers(evt.EVT_DIMSE_SENT):
            send(primitive, context_id)
            return
        command = c_store_rsp_command(
            message_id=primitive.MessageIDBeingRespondedTo,
            sop_class_uid=primitive.AffectedSOPClassUID,
            sop_instance_uid=primitive.AffectedSOPInstanceUID,
            status=primitive.Status,
        )
        maximum = dimse.maximum_pdu_size
        if maximum and len(command) > maximum - 6:
            send(primitive, context_id)  # would need fragments (a peer's PDU under 100 bytes)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        assoc.dul.send_pdu(pdata)

    dimse.send_msg = send_msg
