"""A throwaway PostgreSQL cluster for the tests, and a fresh database for each test.

``postgres_cluster`` (one per test session) runs ``initdb`` into a temporary
folder and starts the server on a free port on 127.0.0.1 with trust
authentication; it is stopped and removed at the end. ``postgres_url`` creates
an empty database in it for one test. The server binaries come from Debian's
``postgresql`` package (``.ci/run`` installs it); without them the fixture
fails with one line saying so, it never skips.

``initdb`` refuses to run as root, so as root the cluster runs as the
``postgres`` user the package creates.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

INSTALLED = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


def server_binaries() -> Path:
    """The newest installed ``bin`` folder of the PostgreSQL server."""
    found = sorted(INSTALLED.glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        pytest.fail(
            f"PostgreSQL is not installed (no {INSTALLED}/*/bin/postgres): "
            "apt-get install postgresql",
            pytrace=False,
        )
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _as_owner() -> list[str]:
    """The prefix that runs a command as the cluster's owner: ``postgres`` when we are root."""
    return ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []


@dataclass
class Cluster:
    """One running PostgreSQL server in a temporary folder."""

    root: Path
    bin: Path
    port: int = 0
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            [*_as_owner(), str(self.bin / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            pytest.fail(f"{command[0]} failed: {done.stderr.strip()} {log[-500:]}", pytrace=False)

    def initdb(self) -> None:
        # --no-sync: the cluster is thrown away; the server itself still fsyncs its commits.
        # A language's collation (ICU), as most servers have, not byte order: the store
        # must not depend on the server's default collation.
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
            "--locale-provider=icu", "--icu-locale=en-US", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        self.port = _free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def restart(self) -> None:
        """Restart the server as a crash-free maintenance would: every connection is ended
        (``-m fast``), and it serves again on the same port with the same settings."""
        log = str(self.log)
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        """Stop the server if it runs (also after a start that failed half-way)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    async def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"test_{next(self._names)}"
        admin = await asyncpg.connect(self.url())
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    binaries = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="session-manager-postgres-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam(SUPERUSER)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(root, binaries)
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def postgres_url(postgres_cluster: Cluster) -> str:
    """The URL of an empty database of its own."""
    return await postgres_cluster.create_database()
