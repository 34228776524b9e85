"""Start-up failures: one line on stderr, its own exit code, nothing served.

Each test starts the real ``session-manager serve`` as a subprocess; the exit
codes are the table in docs/operations.md, Start-up failures (``service.startup.ExitCode``).
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.startup import ExitCode
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc
from tests.servers import Refusal, ServerProcess, failed_start

NOT_LOCAL = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this host


def _one_line(refusal: Refusal, code: ExitCode, *words: str) -> str:
    assert refusal.code == code, (refusal.code, refusal.lines)
    assert len(refusal.lines) == 1, refusal.lines
    line = refusal.lines[0]
    assert line.startswith("session-manager: "), line
    for word in words:
        assert word in line, (word, line)
    return line


def _create_and_get(address: str, instance_id: str) -> pb.GetSessionResponse:
    with grpc.insecure_channel(address) as channel:
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id), timeout=10)
        answer: pb.GetSessionResponse = sessions.GetSession(
            pb.GetSessionRequest(instance_id=instance_id), timeout=10
        )
        return answer


@pytest.fixture
def running(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(tmp_path / "sessions.db") as server:
        yield server


def test_a_second_server_on_the_same_database_is_refused(
    tmp_path: Path, running: ServerProcess
) -> None:
    refusal = failed_start(tmp_path / "sessions.db")
    _one_line(
        refusal,
        ExitCode.DATABASE_IN_USE,
        str(tmp_path / "sessions.db"),
        f"pid {running.pid}",
        f"127.0.0.1:{running.port}",
    )
    # The first one goes on owning the file and answering from it.
    answer = _create_and_get(running.address, "sender_1")
    assert answer.session.instance_id == "sender_1"
    assert answer.session.revision == 1


def test_a_second_server_on_the_same_port_is_refused(
    tmp_path: Path, running: ServerProcess
) -> None:
    refusal = failed_start(tmp_path / "other.db", f"--address={running.address}")
    _one_line(refusal, ExitCode.ADDRESS_IN_USE, running.address, "another process")
    assert not (tmp_path / "other.db").exists()  # refused before opening anything
    assert _create_and_get(running.address, "sender_2").session.revision == 1


def test_a_second_server_on_the_same_database_and_port_names_the_owner(
    tmp_path: Path, running: ServerProcess
) -> None:
    refusal = failed_start(tmp_path / "sessions.db", f"--address={running.address}")
    _one_line(refusal, ExitCode.DATABASE_IN_USE, f"pid {running.pid}", running.address)


def test_the_database_is_free_again_after_sigkill(tmp_path: Path) -> None:
    database = tmp_path / "sessions.db"
    with ServerProcess.start(database) as first:
        _create_and_get(first.address, "kept")
        first.kill()
    with ServerProcess.start(database) as second:
        with grpc.insecure_channel(second.address) as channel:
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            kept = sessions.GetSession(pb.GetSessionRequest(instance_id="kept"), timeout=10)
        assert kept.session.instance_id == "kept"
        assert second.stop() == 0


def test_a_corrupt_database_refuses_to_start(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database\n" * 400)
    _one_line(failed_start(garbage), ExitCode.DATABASE_CORRUPT, str(garbage), "corrupt")

    # A real database whose first table page was overwritten: the quick check finds it.
    damaged = tmp_path / "damaged.db"
    with ServerProcess.start(damaged) as server:
        for n in range(30):
            _create_and_get(server.address, f"s{n}")
        assert server.stop() == 0
    with contextlib.closing(sqlite3.connect(damaged)) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
    content = bytearray(damaged.read_bytes())
    content[page : page + 16] = b"\xff" * 16
    damaged.write_bytes(bytes(content))
    _one_line(failed_start(damaged), ExitCode.DATABASE_CORRUPT, str(damaged), "corrupt")


def test_a_database_from_a_newer_release_refuses_to_start(tmp_path: Path) -> None:
    database = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA user_version = 99")
    line = _one_line(failed_start(database), ExitCode.SCHEMA_TOO_NEW, str(database), "99")
    assert "newer release" in line


def test_a_database_that_cannot_be_created_refuses_to_start(tmp_path: Path) -> None:
    in_the_way = tmp_path / "data"
    in_the_way.write_text("a file where the database directory should be\n")
    refusal = failed_start(in_the_way / "sessions.db")
    _one_line(refusal, ExitCode.DATABASE_NOT_WRITABLE, str(in_the_way))


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: not even root may write ``path`` (tests run as root, where modes do not)."""
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"this filesystem has no immutable files: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("frozen", ["file", "directory"])
def test_a_database_that_cannot_be_written_refuses_to_start(tmp_path: Path, frozen: str) -> None:
    database = tmp_path / "data" / "sessions.db"
    with ServerProcess.start(database) as server:
        _create_and_get(server.address, "kept")
        assert server.stop() == 0
    with _immutable(database if frozen == "file" else database.parent):
        refusal = failed_start(database)
    _one_line(refusal, ExitCode.DATABASE_NOT_WRITABLE, str(database))
    with ServerProcess.start(database) as server:  # writable again: nothing was lost
        _create_and_get(server.address, "after")


def test_an_address_of_another_host_refuses_to_start(tmp_path: Path) -> None:
    refusal = failed_start(
        tmp_path / "s.db", f"--address={NOT_LOCAL}:50051", "--allow-unauthenticated-remote"
    )
    _one_line(refusal, ExitCode.ADDRESS_UNUSABLE, f"{NOT_LOCAL}:50051")
    assert not (tmp_path / "s.db").exists()


def test_a_busy_http_address_refuses_to_start(tmp_path: Path, running: ServerProcess) -> None:
    refusal = failed_start(tmp_path / "other.db", f"--http-address={running.address}")
    _one_line(refusal, ExitCode.ADDRESS_IN_USE, running.address, "--http-address")


def test_a_remote_address_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    refusal = failed_start(tmp_path / "s.db", "--address=0.0.0.0:0")
    _one_line(refusal, ExitCode.INSECURE_ADDRESS, "0.0.0.0:0", "without tokens")


def test_a_busy_or_foreign_metrics_address_refuses_to_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        refusal = failed_start(tmp_path / "s.db", f"--metrics-address={busy}")
        _one_line(refusal, ExitCode.METRICS_ADDRESS, busy, "--metrics-address")
    refusal = failed_start(tmp_path / "s.db", f"--metrics-address={NOT_LOCAL}:9464")
    _one_line(refusal, ExitCode.METRICS_ADDRESS, f"{NOT_LOCAL}:9464")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def two_certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls")
    for name in ("one", "two"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-days", "2", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=root)  # fmt: skip
    return root


def test_tls_files_that_are_missing_or_do_not_match_refuse_to_start(
    tmp_path: Path, two_certificates: Path
) -> None:
    cert, other_key = two_certificates / "one.pem", two_certificates / "two.key"
    missing = two_certificates / "missing.key"
    refusal = failed_start(tmp_path / "s.db", f"--tls-cert={cert}", f"--tls-key={missing}")
    _one_line(refusal, ExitCode.FILE_UNREADABLE, str(missing), "No such file")
    refusal = failed_start(tmp_path / "s.db", f"--tls-cert={cert}", f"--tls-key={other_key}")
    _one_line(refusal, ExitCode.TLS_KEY_MISMATCH, str(cert), str(other_key), "does not match")
    assert not (tmp_path / "s.db").exists()


def test_an_unreadable_token_file_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "tokens.txt"
    refusal = failed_start(tmp_path / "s.db", f"--public-token-file={missing}")
    _one_line(refusal, ExitCode.FILE_UNREADABLE, str(missing))
