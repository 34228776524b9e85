"""Which node should own a session: rendezvous (highest random weight) hashing.

Each session goes to the live node with the highest weight ``hash(node, session)``.
When a node joins, it wins only the sessions whose weight it tops; when one
leaves, only its own sessions go, each to its next-best node. Nothing else moves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(node_id: str, instance_id: str) -> int:
    digest = hashlib.blake2b(f"{node_id}\x00{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(instance_id: str, node_ids: Iterable[str]) -> str | None:
    """The node that should own ``instance_id`` among ``node_ids``; None when there is none."""
    best: tuple[int, str] | None = None
    for node_id in node_ids:
        candidate = (weight(node_id, instance_id), node_id)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]
