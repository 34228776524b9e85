"""Access control: tokens per service, open health checks, TLS and mTLS."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.clock import ManualClock
from service.config import Settings
from service.server import InsecureAddress, start
from sessionmanager.v1 import engine_service_pb2 as engine_pb
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc
from sessionmanager_client import TLS, AsyncSessionManagerClient
from sessionmanager_client.errors import PermissionDeniedError
from tests.conftest import start_harness
from tests.status_details import error_info

PUBLIC = b"public-token-for-central-hub"
INTERNAL = b"internal-token-for-the-engine"


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(error_info(error).reason)


def _bearer(token: bytes) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token.decode()}"),)


@pytest.fixture
def secured(settings: Settings) -> Settings:
    return dataclasses.replace(settings, public_tokens=(PUBLIC,), internal_tokens=(INTERNAL,))


async def test_tokens_gate_each_service(secured: Settings) -> None:
    harness = await start_harness(secured, ManualClock())
    try:
        create = pb.CreateSessionRequest(instance_id="sender_1")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await harness.sessions.CreateSession(create)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(missing.value) == "UNAUTHENTICATED"

        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await harness.sessions.CreateSession(create, metadata=_bearer(b"guess"))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED

        with pytest.raises(grpc.aio.AioRpcError) as internal_on_public:
            await harness.sessions.CreateSession(create, metadata=_bearer(INTERNAL))
        assert internal_on_public.value.code() == grpc.StatusCode.PERMISSION_DENIED

        created = await harness.sessions.CreateSession(create, metadata=_bearer(PUBLIC))
        assert created.session.instance_id == "sender_1"

        report = engine_pb.ReportErrorRequest(
            instance_id="sender_1", code="TEMPORARY_BAN", message="banned"
        )
        with pytest.raises(grpc.aio.AioRpcError) as public_on_internal:
            await harness.engine.ReportError(report, metadata=_bearer(PUBLIC))
        assert public_on_internal.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _reason(public_on_internal.value) == "PERMISSION_DENIED"
        # A refused call changed nothing.
        got = await harness.sessions.GetSession(
            pb.GetSessionRequest(instance_id="sender_1"), metadata=_bearer(PUBLIC)
        )
        assert got.session.revision == 1

        failed = await harness.engine.ReportError(report, metadata=_bearer(INTERNAL))
        assert failed.session.last_error_code == "TEMPORARY_BAN"

        stream = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="sender_1"))
        with pytest.raises(grpc.aio.AioRpcError) as unwatched:
            await stream.read()
        assert unwatched.value.code() == grpc.StatusCode.UNAUTHENTICATED

        probe = health_pb2_grpc.HealthStub(harness.channel)
        answer = await probe.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await harness.stop()


async def test_refuses_a_remote_address_without_tokens(settings: Settings) -> None:
    remote = dataclasses.replace(settings, address="0.0.0.0:0")
    with pytest.raises(InsecureAddress):
        await start(remote, ManualClock())
    assert isinstance(settings.database, Path)
    assert not settings.database.exists()  # nothing was opened

    allowed = dataclasses.replace(remote, allow_unauthenticated_remote=True)
    running = await start(allowed, ManualClock())
    await running.stop(grace=0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    root = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=root)  # fmt: skip
    (root / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem",
                 cwd=root)  # fmt: skip
    return root


async def _create_over(channel: grpc.aio.Channel) -> str:
    stub = session_service_pb2_grpc.SessionServiceStub(channel)
    created = await stub.CreateSession(pb.CreateSessionRequest(instance_id="tls_1"), timeout=5)
    return created.session.instance_id


async def test_tls_and_mutual_tls(settings: Settings, pki: Path) -> None:
    tls = dataclasses.replace(
        settings,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    running = await start(tls, ManualClock())
    target = f"localhost:{running.port}"
    ca = (pki / "ca.pem").read_bytes()
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert await _create_over(channel) == "tls_1"

        without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(target, without_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _create_over(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await _create_over(channel)
    finally:
        await running.stop(grace=0)


async def test_client_over_mutual_tls_with_tokens(secured: Settings, pki: Path) -> None:
    """What docs/security.md sets up, used through the client library."""
    server_settings = dataclasses.replace(
        secured,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    running = await start(server_settings, ManualClock())
    tls = TLS(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    address = f"localhost:{running.port}"
    try:
        async with AsyncSessionManagerClient(
            address, tls=tls, token=PUBLIC.decode(), simulator_token=INTERNAL.decode()
        ) as client:
            created = await client.create_session("tls_client")
            assert created.revision == 1
            qr = await client.request_qr("tls_client")
            assert qr.qr_string.startswith("data:image/png;base64,")
            scanned = await client.simulator.scan_qr("tls_client", "+5491122334455")
            assert scanned.phone_number == "+5491122334455"
        async with AsyncSessionManagerClient(address, tls=tls, token=INTERNAL.decode()) as wrong:
            with pytest.raises(PermissionDeniedError):
                await wrong.get_session("tls_client")
    finally:
        await running.stop(grace=0)
