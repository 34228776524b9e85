"""Limits that protect WhatsApp accounts and the server: send rate, watchers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.domain import errors


@dataclass(frozen=True, slots=True)
class Limits:
    #: Messages per second each session may send on average; 0 turns the limit off.
    send_rate: float = 5.0
    #: Messages a session may send at once before the rate applies.
    send_burst: int = 20
    #: Open WatchSession streams per session.
    watchers_per_session: int = 100
    #: Open WatchSession streams in all.
    watchers_total: int = 20_000


def check_watchers(limits: Limits, open_here: int, open_total: int, instance_id: str) -> None:
    """LIMIT_EXCEEDED if one more watcher of ``instance_id`` would pass a watcher limit."""
    if open_here >= limits.watchers_per_session:
        raise errors.limit_exceeded(
            "watchers_per_session",
            f"session {instance_id!r} already has {limits.watchers_per_session} open watchers",
            retry_after=1.0,
            instance_id=instance_id,
        )
    if open_total >= limits.watchers_total:
        raise errors.limit_exceeded(
            "watchers_total",
            f"the server already has {limits.watchers_total} open watchers",
            retry_after=1.0,
            instance_id=instance_id,
        )


class SendBucket:
    """One session's token bucket (WhatsApp bans numbers that send too fast)."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, limits: Limits) -> None:
        self._rate = limits.send_rate
        self._burst = float(max(limits.send_burst, 1))
        self._tokens = self._burst
        self._updated: datetime | None = None

    def take(self, now: datetime) -> float | None:
        """Take one send; ``None`` if allowed, else the seconds until one is."""
        if self._rate <= 0:
            return None
        if self._updated is not None:
            elapsed = max((now - self._updated).total_seconds(), 0.0)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / self._rate
