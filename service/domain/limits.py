"""Limits that protect WhatsApp accounts and the server: send rate, watchers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: datetime) -> None:
        self.tokens = tokens
        self.updated = updated


class SendRate:
    """A token bucket per session (WhatsApp bans numbers that send too fast)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(max(burst, 1))
        self._buckets: dict[str, _Bucket] = {}

    def take(self, instance_id: str, now: datetime) -> float | None:
        """Take one send; ``None`` if allowed, else the seconds until one is."""
        if self._rate <= 0:
            return None
        bucket = self._buckets.get(instance_id)
        if bucket is None:
            bucket = self._buckets[instance_id] = _Bucket(self._burst, now)
        elapsed = max((now - bucket.updated).total_seconds(), 0.0)
        bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / self._rate

    def forget(self, instance_id: str) -> None:
        self._buckets.pop(instance_id, None)
