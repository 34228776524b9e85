"""A census of live engine workers, read from /proc: catches a session run twice.

``WorkerCensus`` samples every process every ``interval`` seconds in a thread
of its own. A worker is a process whose command line runs
``service.engine.worker`` with ``--instance-id=X``; a zombie (exited, not yet
reaped) is not live, a stopped one is (it still holds its connection). Only
instance ids that start with ``prefix`` are counted, so that workers of other
tests on the same machine never count. Any sample where one instance id has
two live workers is recorded as a ``Violation``, with their pids and parents.

Workers are found by their command line, not by their parent, so that a
worker orphaned by the death of its node is still seen.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

WORKER_MODULE = b"service.engine.worker"
_INSTANCE = re.compile(rb"--instance-id=([^\x00 ]+)")
_SESSION = re.compile(rb"--session-id=(\d+)")


@dataclass(frozen=True)
class Worker:
    """One live worker process."""

    pid: int
    parent: int
    instance_id: str
    session_id: int | None
    state: str  # the state letter of /proc/PID/stat: R, S, D, T…


@dataclass(frozen=True)
class Violation:
    """A moment when one instance id had more than one live worker."""

    at: float  # time.monotonic()
    instance_id: str
    workers: tuple[Worker, ...]

    def __str__(self) -> str:
        described = ", ".join(
            f"pid {w.pid} (parent {w.parent}, session {w.session_id}, state {w.state})"
            for w in self.workers
        )
        return f"{self.instance_id}: {len(self.workers)} live workers: {described}"


def _read(path: str) -> bytes:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.read(descriptor, 65536)
    finally:
        os.close(descriptor)


def _worker(pid: int) -> Worker | None:
    """The worker ``pid`` is, or None if it is not a live worker (or is gone)."""
    try:
        cmdline = _read(f"/proc/{pid}/cmdline")
        if WORKER_MODULE not in cmdline:
            return None
        instance = _INSTANCE.search(cmdline)
        if instance is None:
            return None
        # The command name may hold spaces and parentheses: count fields from its last ")".
        fields = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it ended while being read
    state = fields[0].decode()
    if state in ("Z", "X"):
        return None
    session = _SESSION.search(cmdline)
    return Worker(
        pid=pid,
        parent=int(fields[1]),
        instance_id=instance.group(1).decode(),
        session_id=int(session.group(1)) if session else None,
        state=state,
    )


def live_workers(prefix: str = "") -> dict[str, list[Worker]]:
    """Every live worker of an instance id starting with ``prefix``, by instance id."""
    found: dict[str, list[Worker]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        worker = _worker(int(entry.name))
        if worker is not None and worker.instance_id.startswith(prefix):
            found.setdefault(worker.instance_id, []).append(worker)
    return found


class WorkerCensus:
    """Samples live workers in a thread and records every duplicate it sees."""

    def __init__(self, prefix: str, interval: float = 0.015) -> None:
        self.prefix = prefix
        self.interval = interval
        self.samples = 0
        self.violations: list[Violation] = []
        self.latest: dict[str, list[Worker]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="worker-census", daemon=True)

    def start(self) -> WorkerCensus:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> WorkerCensus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def sample(self) -> dict[str, list[Worker]]:
        """Take one sample now (also from the sampling thread), record and return it."""
        found = live_workers(self.prefix)
        now = time.monotonic()
        with self._lock:
            self.samples += 1
            self.latest = found
            for instance_id, workers in found.items():
                if len(workers) > 1:
                    self.violations.append(Violation(now, instance_id, tuple(workers)))
        return found

    def wait_for_samples(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` more samples were taken (so a condition has been looked at)."""
        with self._lock:
            target = self.samples + count
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.samples >= target:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the census took fewer than {count} samples in {timeout} s")
            self._stop.wait(self.interval)

    def assert_never_twice(self) -> None:
        """Fail with every recorded violation, the first ones first."""
        with self._lock:
            violations = list(self.violations)
            samples = self.samples
        assert samples > 0, "the census took no sample"
        assert not violations, (
            f"{len(violations)} of {samples} samples saw a session with two live workers; "
            f"first: {'; '.join(str(v) for v in violations[:5])}"
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
