"""Censuses that catch a session run twice: live engine workers read from /proc
(``WorkerCensus``), and backends writing one session's credentials read from PostgreSQL
(``CredentialCensus``).

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

import asyncio
import os
import re
import threading
import time
from dataclasses import dataclass

import asyncpg

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


# Credential writers: who is writing a session's credential schema, read from PostgreSQL.

#: Lock modes a transaction takes on a table it writes (or alters); a reader's are weaker.
WRITE_LOCKS = (
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)
_WRITERS = f"""
    SELECT n.nspname AS schema, l.pid, a.application_name
    FROM pg_locks l
    JOIN pg_class c ON c.oid = l.relation
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.granted AND l.locktype = 'relation'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND n.nspname LIKE 'wa_device\\_%'
      AND l.mode IN ({", ".join(f"'{mode}'" for mode in WRITE_LOCKS)})
"""
#: The epoch a credential connection names in its ``application_name`` (as the engine tags
#: them: ``… epoch 7 …``, ``epoch=7``), when it names one.
_EPOCH = re.compile(r"\bepoch[ =:]?(\d+)")


@dataclass(frozen=True)
class Writer:
    """One backend holding a write lock on a table of a credential schema."""

    pid: int
    application_name: str

    @property
    def epoch(self) -> int | None:
        found = _EPOCH.search(self.application_name)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class CredentialOverlap:
    """A moment when a credential schema had two writers: at once, or an older epoch's
    writer after a newer one's."""

    at: float
    schema: str
    writers: tuple[Writer, ...]
    why: str

    def __str__(self) -> str:
        described = ", ".join(f"pid {w.pid} ({w.application_name!r})" for w in self.writers)
        return f"{self.schema}: {self.why}: {described}"


class CredentialCensus:
    """Samples, in a thread, the backends that write each ``wa_device_<id>`` schema.

    A writer is a backend holding a granted write lock on a table of the
    schema: it is inside a transaction that wrote (or is writing) there, and it
    keeps that lock until the transaction ends. An idle connection, however it
    was opened and whatever its ``search_path``, holds no such lock, so a node
    or a worker that merely reconnects is never counted. Two distinct backends
    with such locks on one schema in one sample are two writers at once (two
    write locks of these modes on one table can be granted together, and the
    tables of one schema are one device's). When the connections name their
    epoch in ``application_name``, a writer of an older epoch seen after one of
    a newer epoch is recorded too: the old owner wrote after the new one began.
    """

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self.url = url
        self.interval = interval
        self.samples = 0
        self.writes_seen = 0  # samples in which some schema had a writer
        self.violations: list[CredentialOverlap] = []
        self.failures = 0  # samples PostgreSQL did not answer (a restart of the server)
        self._newest: dict[str, int] = {}  # schema -> the newest epoch seen writing it
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="credential-census", daemon=True)

    def start(self) -> CredentialCensus:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def __enter__(self) -> CredentialCensus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def record(self, rows: list[tuple[str, int, str]]) -> None:
        """Record one sample: (schema, backend pid, application_name) per write lock held."""
        now = time.monotonic()
        by_schema: dict[str, dict[int, Writer]] = {}
        for schema, pid, application in rows:
            by_schema.setdefault(schema, {})[pid] = Writer(pid, application or "")
        with self._lock:
            self.samples += 1
            self.writes_seen += bool(by_schema)
            for schema, writers in sorted(by_schema.items()):
                found = tuple(writers[pid] for pid in sorted(writers))
                if len(found) > 1:
                    self.violations.append(
                        CredentialOverlap(now, schema, found, "two backends write it at once")
                    )
                epochs = [w.epoch for w in found if w.epoch is not None]
                if not epochs:
                    continue
                newest = self._newest.get(schema, 0)
                if min(epochs) < newest:
                    self.violations.append(
                        CredentialOverlap(
                            now, schema, found, f"epoch {min(epochs)} writes after epoch {newest}"
                        )
                    )
                self._newest[schema] = max(newest, *epochs)

    def assert_never_two_writers(self) -> None:
        with self._lock:
            violations = list(self.violations)
            samples = self.samples
        assert samples > 0, "the credential census took no sample"
        assert not violations, (
            f"{len(violations)} credential writer overlaps in {samples} samples; "
            f"first: {'; '.join(str(v) for v in violations[:5])}"
        )

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._sample_until_stopped())
        finally:
            loop.close()

    async def _sample_until_stopped(self) -> None:
        db: asyncpg.Connection | None = None
        while not self._stop.is_set():
            try:
                if db is None or db.is_closed():
                    db = await asyncpg.connect(self.url, timeout=5)
                rows = await db.fetch(_WRITERS, timeout=5)
                self.record([(r["schema"], r["pid"], r["application_name"]) for r in rows])
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                with self._lock:
                    self.failures += 1
                if db is not None:
                    db.terminate()
                db = None
            await asyncio.sleep(self.interval)  # the sampling period
        if db is not None:
            await db.close()
