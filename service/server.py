"""The asyncio gRPC server: services, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.auth import INTERNAL, PUBLIC, TokenInterceptor, Tokens
from service.api.health import Serving
from service.api.http import HttpServer, Options, start_http
from service.api.metrics import Metrics, MetricsInterceptor
from service.api.rpc import EngineService, NodeService, SessionService, SimulatorService
from service.clock import Clock, SystemClock
from service.cluster.routing import ClusterSessions
from service.cluster.runtime import ClusterRuntime
from service.config import PostgresURL, Settings
from service.domain.facade import Sessions
from service.domain.limits import Limits
from service.domain.sessions import SessionManager
from service.engine.credentials import PostgresCredentials
from service.engine.phone import WorkerPhone
from service.engine.port import Engine, EngineFactory, Phone
from service.engine.simulated import PairingTimes, SimulatedEngine
from service.engine.supervisor import WorkerEngine, WorkerOptions
from service.faults import FaultPoints
from service.startup import (
    ExitCode,
    FileLimit,
    StartupError,
    check_address,
    check_exposure,
    check_tls_pair,
    database_failure,
    http_connection_cap,
    loopback_only,
    raise_file_limit,
)
from service.startup import InsecureAddress as InsecureAddress
from service.store import postgres, sqlite
from service.store.ownership import InUse, NotWritable, Ownership
from service.store.port import Store
from sessionmanager.v1 import (
    engine_service_pb2,
    engine_service_pb2_grpc,
    node_service_pb2,
    node_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    simulator_service_pb2,
    simulator_service_pb2_grpc,
)

log = logging.getLogger(__name__)

SESSION_SERVICE = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
ENGINE_SERVICE = engine_service_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
NODE_SERVICE = node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
SIMULATOR_SERVICE = simulator_service_pb2.DESCRIPTOR.services_by_name["SimulatorService"].full_name

MAX_MESSAGE_BYTES = 1 << 20

# Thousands of watch streams may open at once (every open Central Hub page
# holds one). gRPC core queues calls the server has not picked up yet up to
# `max_pending_requests` (default 1,000) and drops them at random up to the hard
# limit (default 3,000), cancelling about a fifth of a burst of 3,000: raise both.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 50_000),
    ("grpc.server.max_pending_requests_hard_limit", 50_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.server_max_unrequested_time_in_server", 60),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default, so a second server on the same port
    # would start and the kernel would split connections between the two.
    ("grpc.so_reuseport", 0),
)


@dataclass
class RunningServer:
    """A started server and what it owns; ``stop`` takes it down in order."""

    server: grpc.aio.Server
    port: int
    manager: SessionManager
    store: Store
    health: health_aio.HealthServicer
    grace: float
    metrics: Metrics | None = None
    http: HttpServer | None = None
    http_options: Options | None = None
    ownership: Ownership | None = None
    #: With PostgreSQL: this node's leases, change feed and channels to the other nodes.
    cluster: ClusterRuntime | None = None
    serving: Serving | None = None

    @property
    def engine(self) -> Engine:
        return self.manager.engine

    @property
    def sessions(self) -> Sessions:
        """What the transports answer from: this node's view when there are several."""
        return self.manager if self.cluster is None else self.cluster.sessions

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def stop(self, grace: float | None = None) -> None:
        if self.serving is not None:
            await self.serving.stop()
        await self.health.enter_graceful_shutdown()
        if self.http is not None and self.http_options is not None:
            self.http_options.draining = True  # new HTTP requests get 503
            self.http.stop_accepting()
        # Every watch stream, gRPC or SSE, ends now (SSE with its final event).
        self.sessions.close_watches()
        await self.server.stop(self.grace if grace is None else grace)
        if self.http is not None:
            await self.http.close()
        if self.cluster is not None:  # its sessions go to the other nodes at once
            await self.cluster.close()
        await self.manager.close()
        await self.store.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.ownership is not None:
            self.ownership.release()
        log.info("stopped")


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind ``--address``; the port it got."""
    credentials = _server_credentials(settings)
    try:
        if credentials is None:
            return server.add_insecure_port(settings.address)
        return server.add_secure_port(settings.address, credentials)
    except RuntimeError as error:  # "Failed to bind"; check_address names the usual causes
        raise StartupError(
            ExitCode.ADDRESS_UNUSABLE, f"cannot listen on {settings.address}: {error}"
        ) from error


def build_engine(settings: Settings, clock: Clock) -> EngineFactory:
    """The engine ``--engine`` names: in process (simulated) or in worker processes.

    With PostgreSQL, workers keep their credentials in the sessions' database,
    so that a session moving to another node reconnects there without a new QR.
    """
    if settings.engine == "simulated":
        times = PairingTimes(
            first=settings.qr_first_seconds,
            rotation=settings.qr_rotation_seconds,
            codes=settings.qr_codes,
        )
        return lambda report: SimulatedEngine(report, clock, times)
    simulated = settings.engine == "simulated-worker"
    worker_args = (
        (
            f"--qr-first={settings.qr_first_seconds}",
            f"--qr-rotation={settings.qr_rotation_seconds}",
            f"--qr-codes={settings.qr_codes}",
        )
        if simulated
        else ()
    )
    options = WorkerOptions(
        engine="simulated" if simulated else "whatsmeow",
        devices_dir=settings.devices_path.resolve(),
        credentials=(
            PostgresCredentials(settings.database)
            if isinstance(settings.database, PostgresURL)
            else None
        ),
        dial_timeout=settings.dial_timeout,
        heartbeat_interval=settings.worker_heartbeat,
        heartbeat_timeout=2 * settings.worker_heartbeat,
        crash_limit=settings.worker_crash_limit,
        log_level=settings.log_level,
        worker_args=worker_args,
    )
    return lambda report: WorkerEngine(options, report, clock)


def simulated_phone(engine: Engine) -> Phone | None:
    """What ``SimulatorService`` drives, when the engine is simulated."""
    if isinstance(engine, SimulatedEngine):
        return engine
    if isinstance(engine, WorkerEngine) and engine.options.engine == "simulated":
        return WorkerPhone(engine)
    return None


async def start(settings: Settings, clock: Clock | None = None) -> RunningServer:
    """Open the database, load every session and start listening."""
    tokens = Tokens(public=settings.public_tokens, internal=settings.internal_tokens)
    files = raise_file_limit()
    http_connections = (
        http_connection_cap(files, settings.http_max_connections) if settings.http_address else 0
    )
    clock = clock or SystemClock()
    check_tls_pair(settings)
    database = settings.database
    # One owner per database, before the address checks (a second server on the same
    # database and port names the database): a lock file beside a SQLite file; for
    # PostgreSQL, the advisory lock the store's connection takes as it opens.
    try:
        ownership = None if isinstance(database, PostgresURL) else Ownership.acquire(database)
    except (InUse, NotWritable) as error:
        raise database_failure(database, error) or error from error
    store: Store | None = None
    try:
        if isinstance(database, PostgresURL):
            store = await postgres.Store.open(
                database, settings.node_id, stall_limit=max(2.0, settings.lease_grace)
            )
        check_address(settings.address, "--address")
        if settings.metrics_address:
            check_address(settings.metrics_address, "--metrics-address", ExitCode.METRICS_ADDRESS)
        if settings.http_address:
            check_address(settings.http_address, "--http-address")
        # After the address checks, which say first that an address is not this host's.
        check_exposure(
            (settings.address, settings.http_address, settings.metrics_address),
            [(PUBLIC, token) for token in tokens.public]
            + [(INTERNAL, token) for token in tokens.internal],
            settings.allow_unauthenticated_remote,
        )
        if store is None:
            store = await sqlite.Store.open(database)
    except Exception as error:
        if store is not None:
            await store.close()
        if ownership is not None:
            ownership.release()
        raise database_failure(database, error) or error from error
    metrics = Metrics() if settings.metrics_address else None
    limits = Limits(
        send_rate=settings.send_rate,
        send_burst=settings.send_burst,
        watchers_per_session=settings.max_watchers_per_session,
        watchers_total=settings.max_watchers,
    )
    manager = SessionManager(
        store,
        build_engine(settings, clock),
        clock,
        qr_timeout=settings.qr_timeout,
        limits=limits,
        metrics=metrics,
    )
    engine = manager.engine
    if metrics is not None and isinstance(engine, WorkerEngine):
        engine.on_restart = metrics.worker_restarts.inc
    server: grpc.aio.Server | None = None
    cluster: ClusterRuntime | None = None
    try:
        if isinstance(store, postgres.Store):
            await manager.start_as_node()
        else:
            await manager.start()
        store.faults.arm(FaultPoints.from_environment())  # tests only: after recovery
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if metrics is not None:
            interceptors.append(MetricsInterceptor(metrics))
        if tokens.enabled:
            interceptors.append(TokenInterceptor(tokens))
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors or None)
        port = _listen(server, settings)
        sessions: Sessions = manager
        forwarding: ClusterSessions | None = None
        if isinstance(store, postgres.Store):
            cluster = ClusterRuntime.build(settings, port, store, manager, limits, tokens, metrics)
            sessions = forwarding = cluster.sessions
            node_service_pb2_grpc.add_NodeServiceServicer_to_server(
                NodeService(cluster.sessions.owner_only()), server
            )
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionService(sessions), server
        )
        engine_service_pb2_grpc.add_EngineServiceServicer_to_server(EngineService(sessions), server)
        services = [SESSION_SERVICE, ENGINE_SERVICE]
        if cluster is not None:
            services.append(NODE_SERVICE)
        phone = simulated_phone(engine)
        if phone is not None:
            simulator_service_pb2_grpc.add_SimulatorServiceServicer_to_server(
                SimulatorService(sessions, phone, forwarding), server
            )
            services.append(SIMULATOR_SERVICE)
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        await server.start()
        if cluster is not None:
            await cluster.start(health_servicer, services)
        if ownership is not None:
            ownership.record(f"{settings.address.rpartition(':')[0]}:{port}")
        if metrics is not None:
            metrics.watch(sessions)
            metrics_tokens = _metrics_tokens(settings, tokens)
            metrics_port = metrics.serve(settings.metrics_address, metrics_tokens)
            log.info("metrics on port %d, path /metrics", metrics_port)
        conditions = [] if cluster is None else [cluster.serving]
        serving = Serving(health_servicer, services, store, conditions)
        http, http_options = None, None
        if settings.http_address:
            http, http_options = start_http(settings, sessions, tokens, metrics, http_connections)
            http_options.serving = serving
    except BaseException:
        if server is not None:
            await server.stop(0)
        if metrics is not None:
            metrics.close()
        if cluster is not None:
            await cluster.close()
        await manager.close()
        await store.close()
        if ownership is not None:
            ownership.release()
        raise
    await serving.start()
    shown = postgres.display(database) if isinstance(database, PostgresURL) else database
    log.info("listening on %s (port %d), database %s", settings.address, port, shown)
    if http is not None:
        log.info(
            "HTTP API on %s (port %d), at most %d connections; %s",
            settings.http_address,
            http.port,
            http_connections,
            _described(files),
        )
    return RunningServer(
        server,
        port,
        manager,
        store,
        health_servicer,
        settings.shutdown_grace,
        metrics,
        http,
        http_options,
        ownership,
        cluster,
        serving,
    )


def _metrics_tokens(settings: Settings, tokens: Tokens) -> Tokens | None:
    """The tokens ``/metrics`` asks for: beyond loopback, either role's; on loopback, none."""
    if not tokens.enabled or loopback_only(settings.metrics_address):
        return None
    return tokens


def _described(files: FileLimit) -> str:
    raised = f" (raised from {files.was})" if files.was != files.soft else ""
    return f"open-file limit {files.soft}{raised}, {files.open_files} open at start-up"


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before anyone can see us ready
        loop.add_signal_handler(signum, stopping.set)
    running = await start(settings)
    print(f"session-manager listening on port {running.port}", flush=True)
    if running.http_port is not None:
        print(f"session-manager http listening on port {running.http_port}", flush=True)
    await stopping.wait()
    log.info("shutting down")
    await running.stop()
