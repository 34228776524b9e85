"""The worker census of the chaos tests (tests/census.py) on fake workers.

A fake worker is a ``sleep`` whose command line reads like a worker's (``exec
-a``), so the census sees exactly what it sees of a real one: the module name
and ``--instance-id=`` in /proc/PID/cmdline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.census import WorkerCensus, live_workers
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
