"""The worker protocol's framing: a 4-byte big-endian length, then the message.

The messages are ``WorkerCommand`` (server to worker, on the worker's standard
input) and ``WorkerEvent`` (worker to server, on its standard output), defined
in ``protos/sessionmanager/v1/worker.proto``.
"""

from __future__ import annotations

import asyncio
import struct

from google.protobuf.message import Message

MAX_FRAME_BYTES = 1 << 20
_HEADER = struct.Struct(">I")

#: A worker that reported what happened and needs no restart exits with 0.
EXIT_DONE = 0
#: A worker that reported a transient failure (WhatsApp unreachable) exits with
#: this (EX_TEMPFAIL): the server starts it again after a backoff. Any other
#: exit is a crash.
EXIT_RETRY = 75


class ProtocolError(Exception):
    """The other end wrote something that is not a frame of the protocol."""


def encode(message: Message) -> bytes:
    body = message.SerializeToString()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body, or ``None`` at a clean end of the stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise ProtocolError("the stream ended inside a frame header") from error
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        raise ProtocolError("the stream ended inside a frame") from error
