"""The censuses of the chaos tests (tests/census.py): workers on fake workers, credential
writers on a real PostgreSQL.

A fake worker is a ``sleep`` whose command line reads like a worker's (``exec
-a``), so the census sees exactly what it sees of a real one: the module name
and ``--instance-id=`` in /proc/PID/cmdline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import asyncpg
import pytest

from tests.census import CredentialCensus, WorkerCensus, live_workers
from tests.processes import alive


class FakeWorkers:
    """Starts fake workers and kills them all at the end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, instance_id: str, session_id: int = 1) -> subprocess.Popen[bytes]:
        argv0 = (
            f"python -m service.engine.worker --instance-id={instance_id} --session-id={session_id}"
        )
        process = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 60', argv0])
        self.processes.append(process)
        deadline = time.monotonic() + 10
        while not _cmdline(process.pid).startswith(b"python -m service.engine.worker"):
            assert time.monotonic() < deadline, "the fake worker did not start"
            time.sleep(0.005)  # polling the exec, bounded above
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read()


def _states(prefix: str, instance_id: str) -> dict[int, str]:
    """The /proc state letter of each live worker of ``instance_id``."""
    return {w.pid: w.state for w in live_workers(prefix).get(instance_id, [])}


@pytest.fixture
def fakes() -> Iterator[FakeWorkers]:
    workers = FakeWorkers()
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def prefix() -> str:
    """An instance id prefix no other test uses."""
    return f"census_{uuid.uuid4().hex[:8]}_"


def test_the_census_catches_one_session_with_two_live_workers(
    fakes: FakeWorkers, prefix: str
) -> None:
    with WorkerCensus(prefix) as census:
        first = fakes.start(f"{prefix}a", session_id=7)
        fakes.start(f"{prefix}b")
        census.wait_for_samples(3)
        assert census.violations == []

        second = fakes.start(f"{prefix}a", session_id=7)
        census.wait_for_samples(3)
        with pytest.raises(AssertionError, match=f"{prefix}a: 2 live workers"):
            census.assert_never_twice()

    violation = census.violations[0]
    assert violation.instance_id == f"{prefix}a"
    assert {w.pid for w in violation.workers} == {first.pid, second.pid}
    assert {w.parent for w in violation.workers} == {os.getpid()}
    assert {w.session_id for w in violation.workers} == {7}


def test_a_zombie_is_not_a_live_worker_and_a_stopped_one_is(
    fakes: FakeWorkers, prefix: str
) -> None:
    first = fakes.start(f"{prefix}a")
    exited = fakes.start(f"{prefix}a")
    os.kill(exited.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(exited.pid):  # not reaped: a zombie until close() waits for it
        assert time.monotonic() < deadline, "the killed fake worker did not exit"
        time.sleep(0.005)

    assert [w.pid for w in live_workers(prefix)[f"{prefix}a"]] == [first.pid]

    stopped = fakes.start(f"{prefix}a")
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while (states := _states(prefix, f"{prefix}a")).get(stopped.pid) != "T":
            assert time.monotonic() < deadline, f"the fake worker did not stop: {states}"
            time.sleep(0.005)
        assert set(states) == {first.pid, stopped.pid}
    finally:
        os.kill(stopped.pid, signal.SIGCONT)


def test_the_census_counts_only_its_own_prefix(fakes: FakeWorkers, prefix: str) -> None:
    other = f"census_other_{uuid.uuid4().hex[:8]}"
    fakes.start(other)
    fakes.start(other)
    with WorkerCensus(prefix) as census:
        census.wait_for_samples(3)
    census.assert_never_twice()
    assert len(live_workers(other)[other]) == 2


# The credential census, against a real PostgreSQL.


async def _credential_connection(url: str, schema: str, application: str) -> asyncpg.Connection:
    """A connection as a worker opens one: its schema selected by ``search_path``."""
    return await asyncpg.connect(
        url, server_settings={"search_path": schema, "application_name": application}
    )


async def _census_sees(census: CredentialCensus, what: Callable[[], bool]) -> None:
    """Wait (bounded) until the census has taken samples after which ``what`` holds."""
    deadline = time.monotonic() + 10
    while True:
        taken = census.samples
        while census.samples < taken + 3:  # at least two full samples since now
            assert time.monotonic() < deadline, "the credential census stopped sampling"
            await asyncio.sleep(census.interval)
        if what():
            return
        assert time.monotonic() < deadline, "the credential census did not see it"


async def test_the_credential_census_sees_two_writers_of_one_schema_at_once(
    postgres_url: str,
) -> None:
    admin = await asyncpg.connect(postgres_url)
    await admin.execute("CREATE SCHEMA wa_device_7; CREATE TABLE wa_device_7.device (p text)")
    await admin.execute("CREATE SCHEMA wa_device_8; CREATE TABLE wa_device_8.device (p text)")
    old = await _credential_connection(postgres_url, "wa_device_7", "worker a")
    new = await _credential_connection(postgres_url, "wa_device_7", "worker b")
    other = await _credential_connection(postgres_url, "wa_device_8", "worker c")
    idle = await _credential_connection(postgres_url, "wa_device_7", "worker d")
    with CredentialCensus(postgres_url, interval=0.01) as census:
        try:
            # One writer, then another after it committed, and a reader: no overlap.
            async with old.transaction():
                await old.execute("INSERT INTO device VALUES ('1')")
                await _census_sees(census, lambda: census.writes_seen > 0)
            async with new.transaction():
                await new.execute("DELETE FROM device")
                await idle.fetch("SELECT * FROM device")  # a reader does not count
                await _census_sees(census, lambda: census.writes_seen > 1)
            # Writers of two sessions' schemas at once: no overlap either.
            async with old.transaction(), other.transaction():
                await old.execute("INSERT INTO device VALUES ('2')")
                await other.execute("INSERT INTO device VALUES ('3')")
                await _census_sees(census, lambda: census.writes_seen > 2)
            census.assert_never_two_writers()

            # Two transactions writing one schema at once: caught, with both backends named.
            async with old.transaction(), new.transaction():
                await old.execute("INSERT INTO device VALUES ('4')")
                await new.execute("INSERT INTO device VALUES ('5')")
                await _census_sees(census, lambda: bool(census.violations))
        finally:
            for connection in (old, new, other, idle):
                await connection.close()
            await admin.close()
    with pytest.raises(AssertionError, match="wa_device_7: two backends write it at once"):
        census.assert_never_two_writers()
    assert {w.application_name for w in census.violations[0].writers} == {"worker a", "worker b"}


def test_the_credential_census_sees_an_older_epoch_write_after_a_newer_one() -> None:
    census = CredentialCensus("postgresql://unused")
    census.record([("wa_device_3", 10, "session-manager worker s epoch 4")])
    census.record([])
    census.record([("wa_device_3", 11, "session-manager worker s epoch 5")])
    census.record([("wa_device_4", 12, "session-manager worker t epoch=1")])
    census.record([("wa_device_3", 11, "session-manager worker s epoch 5")])
    census.assert_never_two_writers()  # one writer at a time, epochs only rising
    census.record([("wa_device_3", 10, "session-manager worker s epoch 4")])
    with pytest.raises(AssertionError, match="wa_device_3: epoch 4 writes after epoch 5"):
        census.assert_never_two_writers()
