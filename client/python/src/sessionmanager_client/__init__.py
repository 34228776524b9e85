"""Central Hub's reference client for the Session Manager.

``AsyncSessionManagerClient`` (``.aio``) and ``SessionManagerClient``
(``.sync``) speak the public ``SessionService``; every contract error becomes
one exception of ``.errors``; ``.reaction`` encodes Central Hub's reaction
table; ``smctl`` (``.cli``) is the command line. ``watch_sessions`` follows
every session and message from the event log, resuming after its
``StreamCursor``. Sessions are returned as the generated ``sessionmanager.v1``
messages (``WhatsAppSession``), which this distribution carries.
"""

from sessionmanager_client._base import TLS, Backoff, StreamCursor
from sessionmanager_client.aio import AsyncSessionManagerClient
from sessionmanager_client.enums import QRStatus, SessionStatus, qr_status_of, status_of
from sessionmanager_client.errors import SessionManagerClientError, from_rpc_error
from sessionmanager_client.reaction import Action, SessionNotReadyError, ensure_can_send, reaction
from sessionmanager_client.sync import SessionManagerClient

__all__ = [
    "TLS",
    "Action",
    "AsyncSessionManagerClient",
    "Backoff",
    "QRStatus",
    "SessionManagerClient",
    "SessionManagerClientError",
    "SessionNotReadyError",
    "SessionStatus",
    "StreamCursor",
    "ensure_can_send",
    "from_rpc_error",
    "qr_status_of",
    "reaction",
    "status_of",
]
