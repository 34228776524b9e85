"""Central Hub's reference client for the Session Manager.

``AsyncSessionManagerClient`` (``client.aio``) and ``SessionManagerClient``
(``client.sync``) speak the public ``SessionService``; every contract error
becomes one exception of ``client.errors``; ``client.reaction`` encodes
Central Hub's reaction table; ``smctl`` (``client.cli``) is the command line.
Sessions are returned as the generated ``WhatsAppSession`` messages.
"""

from client._common import TLS, Backoff
from client.aio import AsyncSessionManagerClient
from client.enums import QRStatus, SessionStatus, qr_status_of, status_of
from client.errors import SessionManagerClientError, from_rpc_error
from client.reaction import Action, SessionNotReadyError, ensure_can_send, reaction
from client.sync import SessionManagerClient

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
    "ensure_can_send",
    "from_rpc_error",
    "qr_status_of",
    "reaction",
    "status_of",
]
