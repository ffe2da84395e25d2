"""Framing between the relay ClientApp and the node worker: length-prefixed protobuf frames.

A request is two frames, a Flower `Context` (run id, node id and run config only: the relay's
node config and state are not sent, the worker uses its own) and the Flower `Message`; a reply is
one status byte and one frame (the reply `Message`, or a fixed error text). Flower's own protobuf
serde (`flwr.common.serde`) does the encoding, so every record type Flower can send passes
unchanged. Standard library + flwr only: the relay imports this module.
"""

from __future__ import annotations

import socket
import struct

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

MAX_FRAME = 2**31 - 1  # Flower's own gRPC limit is far below this; a larger frame is corrupt
_LENGTH = struct.Struct("!Q")
REPLY_OK = b"\x00"
REPLY_ERROR = b"\x01"


class WireError(ConnectionError):
    """The peer closed the connection early or sent a frame that is not ours."""


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise WireError(f"connection closed with {remaining} of {size} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME}")
    return _recv_exact(sock, size)


def send_request(sock: socket.socket, message: Message, context: Context) -> None:
    """Send `message` with the parts of `context` the worker may use (never node config/state)."""
    bare = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config={},
        state=RecordDict(),
        run_config=dict(context.run_config),
    )
    send_frame(sock, context_to_proto(bare).SerializeToString())
    send_frame(sock, message_to_proto(message).SerializeToString())


def recv_request(sock: socket.socket) -> tuple[Message, Context]:
    context = context_from_proto(ProtoContext.FromString(recv_frame(sock)))
    message = message_from_proto(ProtoMessage.FromString(recv_frame(sock)))
    return message, context


def send_reply(sock: socket.socket, reply: Message) -> None:
    sock.sendall(REPLY_OK)
    send_frame(sock, message_to_proto(reply).SerializeToString())


def send_error(sock: socket.socket, text: str) -> None:
    sock.sendall(REPLY_ERROR)
    send_frame(sock, text.encode())


def recv_reply(sock: socket.socket) -> Message:
    """The worker's reply; a worker-side failure raises `RuntimeError` with the worker's text."""
    status = _recv_exact(sock, 1)
    payload = recv_frame(sock)
    if status == REPLY_OK:
        return message_from_proto(ProtoMessage.FromString(payload))
    if status == REPLY_ERROR:
        raise RuntimeError(payload.decode(errors="replace"))
    raise WireError(f"unknown reply status {status!r}")
