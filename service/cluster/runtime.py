"""One node's cluster parts, assembled: its leases, its change feed, its channels to the others."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from service.api.auth import Tokens
from service.cluster.feed import Feed
from service.cluster.forwarding import Peers
from service.cluster.node import Node, NodeMetrics, NodeSettings
from service.cluster.routing import ClusterSessions
from service.config import Settings
from service.domain.limits import Limits
from service.domain.sessions import SessionManager
from service.startup import ExitCode, StartupError
from service.store import postgres

log = logging.getLogger(__name__)


@dataclass
class ClusterRuntime:
    node: Node
    feed: Feed
    peers: Peers
    sessions: ClusterSessions

    @classmethod
    def build(
        cls,
        settings: Settings,
        port: int,
        store: postgres.Store,
        manager: SessionManager,
        limits: Limits,
        tokens: Tokens,
        metrics: NodeMetrics | None,
    ) -> ClusterRuntime:
        if tokens.enabled and not tokens.internal:
            raise StartupError(
                ExitCode.BAD_SETTING,
                "nodes forward commands to each other with the internal token: "
                "set SESSION_MANAGER_INTERNAL_TOKEN (the same on every node) as well",
            )
        node_settings = NodeSettings(
            node_id=settings.node_id,
            address=settings.node_address or advertised(settings.address, port),
            lease_ttl=settings.lease_ttl,
            lease_grace=settings.lease_grace,
            moves_per_second=settings.moves_per_second,
        )
        node = Node(node_settings, store, manager, metrics, commit_health=store)
        feed = Feed(store.url, limits)
        peers = Peers(
            settings.node_id,
            tokens.internal[0] if tokens.internal else None,
            peer_credentials(settings),
        )
        return cls(node, feed, peers, ClusterSessions(manager, node, store, feed, peers))

    async def start(self, health: health_aio.HealthServicer, services: Sequence[str]) -> None:
        """Follow the database's changes, join the nodes and take this node's share."""
        names = ("", *services)

        def on_health(serving: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING
            if not serving:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
                log.error("lost the database: this node reports itself not serving")
            for name in names:
                asyncio.get_running_loop().create_task(health.set(name, status))

        await self.feed.start()
        self.node.on_health = on_health
        await self.node.start()

    def serving(self) -> bool:
        return self.node.connected and self.feed.connected

    async def close(self) -> None:
        """Hand this node's sessions over, then stop following changes."""
        await self.node.stop()
        await self.feed.close()
        await self.peers.close()


def peer_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """With TLS, a node calls the others as a client presenting its own certificate."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None,
        private_key=settings.tls_key.read_bytes(),
        certificate_chain=settings.tls_cert.read_bytes(),
    )


def advertised(address: str, port: int) -> str:
    """``--address`` with the port it got; a wildcard host is not reachable, so it is refused."""
    host = address.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", ""):
        raise StartupError(
            ExitCode.BAD_SETTING,
            f"--address {address} listens on every interface: set --node-address to the "
            "host:port where the other nodes reach this node",
        )
    return f"{host}:{port}"
