"""Where a message may go from where it stands: forward only.

A message is recorded ``pending``; its outcome makes it ``sent``, ``failed``
or ``unknown``; WhatsApp's receipts then make it ``delivered`` and ``read``,
or ``failed`` when WhatsApp could not deliver it after all. A status never
moves back: a late delivery receipt after ``read`` changes nothing, and
nothing follows ``read`` or ``failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.domain.contract import (
    DELIVERED,
    FAILED,
    PENDING,
    READ,
    SENT,
    UNKNOWN_MESSAGE,
    MessageStatus,
)

#: Each status and the statuses a message may move to from it.
_NEXT: dict[MessageStatus, frozenset[MessageStatus]] = {
    PENDING: frozenset({SENT, FAILED, UNKNOWN_MESSAGE, DELIVERED, READ}),
    UNKNOWN_MESSAGE: frozenset({SENT, FAILED, DELIVERED, READ}),
    SENT: frozenset({DELIVERED, READ, FAILED}),
    DELIVERED: frozenset({READ}),
    READ: frozenset(),
    FAILED: frozenset(),
}

#: What a receipt may report.
RECEIPT_STATUSES = frozenset({DELIVERED, READ, FAILED})


def moves_forward(current: MessageStatus, new: MessageStatus) -> bool:
    """Whether a message ``current`` may become ``new``."""
    return new in _NEXT[current]


def predecessors(new: MessageStatus) -> tuple[MessageStatus, ...]:
    """The statuses from which a message may become ``new``, in a stable order."""
    return tuple(status for status, following in _NEXT.items() if new in following)


@dataclass(frozen=True, slots=True)
class MessageReceipt:
    """WhatsApp's word on sent messages, by WhatsApp's ids: delivered, read, or failed.

    ``at`` is the time WhatsApp gives the receipt; ``code`` and ``message`` say
    why, for a failure.
    """

    whatsapp_message_ids: tuple[str, ...]
    status: MessageStatus
    at: datetime
    code: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.status not in RECEIPT_STATUSES:
            raise ValueError(f"a receipt reports delivered, read or failed, not {self.status}")
