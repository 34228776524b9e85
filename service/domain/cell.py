"""Everything the server holds for one session incarnation, in one object."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from service.domain import errors
from service.domain.limits import Limits, SendBucket
from service.domain.states import Event, Session, SessionRef

#: What follows a committed change in the outside world (a logout), given the committed state.
Effect = Callable[[Session], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Doubt:
    """A change whose commit may have landed: what it would have stored, and what follows it."""

    event: Event | None
    #: The state it would have committed; None for a deletion.
    updated: Session | None
    effect: Effect | None


@dataclass(eq=False)
class SessionCell:
    """One incarnation of a session: its committed state and what runs for it.

    Every change of the state happens under ``lock``; a cell that was deleted
    stays deleted (``gone``), so whoever waited on its lock learns that its
    session no longer exists and never touches a newer incarnation.
    """

    instance_id: str
    limits: Limits
    #: The committed state; ``None`` while its creation is being committed.
    session: Session | None = None
    gone: bool = False
    #: The session went to another node (several nodes): it lives on there.
    moved: bool = False
    #: The device was unlinked by request: engine reports are refused until a new pairing.
    unlinked: bool = False
    #: The last commit's answer was lost and it is not known whether it landed: the stored
    #: row is read again before anything else is done with the session.
    doubt: Doubt | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The commit that creates it (awaited by a second creation of the same instance_id).
    creation: asyncio.Task[Session] | None = None
    #: Set once a session taken over from another node is ready for requests (its
    #: reconnection committed): until then a request waits rather than act on a stored
    #: ``connected`` that no worker here stands behind yet.
    arrival: asyncio.Event | None = None
    #: The pairing being started (shared by concurrent RequestQR calls).
    pairing: asyncio.Task[None] | None = None
    #: The timer that marks the shown code expired.
    expiry: asyncio.Task[None] | None = None
    #: Sends under way, by idempotency key: (request digest, shared result).
    sends: dict[str, tuple[str, asyncio.Future[Any]]] = field(default_factory=dict)
    bucket: SendBucket = field(init=False)

    def __post_init__(self) -> None:
        self.bucket = SendBucket(self.limits)

    @property
    def live(self) -> bool:
        return self.session is not None and not self.gone

    @property
    def current(self) -> Session:
        """The committed state; SESSION_NOT_FOUND once deleted or before it exists.

        SESSION_MOVING once the session went to another node: whoever waited on
        this cell retries there.
        """
        if self.moved:
            raise errors.session_moving(self.instance_id, "has moved to another node")
        if self.session is None or self.gone:
            raise errors.session_not_found(self.instance_id)
        return self.session

    @property
    def ref(self) -> SessionRef:
        return self.current.ref

    def stop_timer(self) -> None:
        """Cancel the expiry timer (a pairing under way ends by itself once its worker stops)."""
        if self.expiry is not None and self.expiry is not asyncio.current_task():
            self.expiry.cancel()
        self.expiry = None
