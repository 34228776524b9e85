"""The baseline: a bare grpc.aio server with a no-op unary RPC and a no-op fan-out stream.

``Noop`` answers nothing; ``Sized`` answers as many bytes as its request
names (ASCII digits), so that a call that returns a session can be set against
gRPC's own cost of moving the same bytes. Run as ``python -m bench.bare``; it
prints the port it listens on, like the real server.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc

from service.server import SERVER_OPTIONS

NOOP = "/bench.Bare/Noop"
SIZED = "/bench.Bare/Sized"
WATCH = "/bench.Bare/Watch"
PUBLISH = "/bench.Bare/Publish"


def _identity(value: bytes) -> bytes:
    return value


class Fanout:
    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes]] = set()
        self.replies: dict[bytes, bytes] = {}

    async def noop(self, request: bytes, context: Any) -> bytes:
        return b""

    async def sized(self, request: bytes, context: Any) -> bytes:
        """As many bytes as the request names, made once: the reply costs gRPC alone."""
        reply = self.replies.get(request)
        if reply is None:
            reply = self.replies[request] = b"x" * int(request)
        return reply

    async def publish(self, request: bytes, context: Any) -> bytes:
        for queue in self.queues:
            queue.put_nowait(request)
        return b""

    async def watch(self, request: bytes, context: Any) -> Any:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self.queues.add(queue)
        try:
            yield b"\x08\x01"  # the current state first
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)


async def main() -> None:
    fanout = Fanout()
    handler = grpc.method_handlers_generic_handler(
        "bench.Bare",
        {
            "Noop": grpc.unary_unary_rpc_method_handler(fanout.noop, _identity, _identity),
            "Sized": grpc.unary_unary_rpc_method_handler(fanout.sized, _identity, _identity),
            "Publish": grpc.unary_unary_rpc_method_handler(fanout.publish, _identity, _identity),
            "Watch": grpc.unary_stream_rpc_method_handler(fanout.watch, _identity, _identity),
        },
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare listening on port {port}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
