"""Fault points: named places where a test can make the service crash or fail.

They sit between an intent's commit, its effect on the outside world and the
commit of its outcome, and in the store's commit itself, so that the crash
harness can prove a failure at any of them leaves a state that recovery
completes or reports truthfully. Off unless ``SESSION_MANAGER_FAULTS`` names
some (tests only), e.g. ``send.after_effect=kill:0.05,commit=fail:0.01``:

- ``kill`` ends the process with SIGKILL, as a power cut would;
- ``fail`` raises the error SQLite gives on a full disk;
- ``lose`` raises a lost connection, as when the answer to a COMMIT that
  landed never arrives (``commit.acknowledged``, PostgreSQL).

The number is the probability of firing at each pass (1 when left out).
Points: ``commit``, ``commit.acknowledged``, ``settle`` (finding out whether a
commit in doubt landed), ``send.after_intent``,
``send.after_effect``, ``disconnect.after_commit``, ``delete.after_commit``.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field

ENVIRONMENT = "SESSION_MANAGER_FAULTS"
POINTS = frozenset(
    {
        "commit",
        "commit.acknowledged",
        "settle",
        "send.after_intent",
        "send.after_effect",
        "disconnect.after_commit",
        "delete.after_commit",
    }
)
DISK_FULL = "database or disk is full"
LOST_ANSWER = "the connection was lost before the answer to COMMIT arrived (a fault point)"
ACTIONS = ("kill", "fail", "lose")


@dataclass(slots=True)
class _Fault:
    action: str
    probability: float
    #: How many more times it fires; None: without end.
    times: int | None = None
    #: How many passes it lets through first.
    after: int = 0


def _parse(spec: str) -> dict[str, _Fault]:
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = item.partition("=")
        action, _, probability = rest.partition(":")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENVIRONMENT}: unknown fault {item!r}")
        faults[point] = _Fault(action, float(probability or 1))
    return faults


@dataclass
class FaultPoints:
    """The armed faults; ``hit(point)`` fires the one armed there, if any."""

    faults: dict[str, _Fault] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> FaultPoints:
        return cls(_parse(environ.get(ENVIRONMENT, "")))

    def fail_next(self, point: str, times: int = 1, after: int = 0, action: str = "fail") -> None:
        """Make ``times`` passes at ``point`` fail, after letting ``after`` through."""
        self.faults[point] = _Fault(action, 1.0, times, after)

    def arm(self, other: FaultPoints) -> None:
        """Arm the faults of ``other`` here too (the store and the domain share one set)."""
        self.faults.update(other.faults)

    def hit(self, point: str) -> None:
        fault = self.faults.get(point)
        if fault is None or self.rng.random() >= fault.probability:
            return
        if fault.after > 0:
            fault.after -= 1
            return
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[point]
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "lose":
            raise ConnectionResetError(LOST_ANSWER)
        raise sqlite3.OperationalError(DISK_FULL)
