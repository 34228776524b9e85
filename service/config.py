"""The server's settings: flags, then environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.api.auth import parse_tokens

ENGINES = ("simulated", "simulated-worker", "whatsmeow")


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "127.0.0.1:50051"
    database: Path = Path("data/sessions.db")
    engine: str = "whatsmeow"
    #: Where each session's WhatsApp credentials live; default: ``devices`` beside the database.
    devices_dir: Path | None = None
    dial_timeout: float = 30.0
    worker_heartbeat: float = 5.0
    worker_crash_limit: int = 5
    log_level: str = "info"
    qr_timeout: float = 30.0
    qr_first_seconds: float = 60.0
    qr_rotation_seconds: float = 20.0
    qr_codes: int = 6
    shutdown_grace: float = 10.0
    metrics_address: str = ""
    log_format: str = "text"
    send_rate: float = 5.0
    send_burst: int = 20
    max_watchers_per_session: int = 100
    max_watchers: int = 20_000
    public_token_file: Path | None = None
    internal_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    allow_unauthenticated_remote: bool = False
    #: Read from SESSION_MANAGER_PUBLIC_TOKEN / _INTERNAL_TOKEN or the token files.
    public_tokens: tuple[bytes, ...] = ()
    internal_tokens: tuple[bytes, ...] = ()
    #: The HTTP/JSON API and its event streams; off when empty.
    http_address: str = "127.0.0.1:8080"
    #: Browser origins allowed to call the HTTP API (CORS), comma-separated; none by default.
    cors_origins: str = ""
    #: Seconds between keep-alive comments on an idle event stream.
    sse_keepalive: float = 15.0

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(origin.strip() for origin in self.cors_origins.split(",") if origin.strip())

    @property
    def devices_path(self) -> Path:
        return self.devices_dir or self.database.parent / "devices"


# (flag, environment variable, field, type, help)
_OPTIONS: tuple[tuple[str, str, str, type, str], ...] = (
    (
        "--address",
        "SESSION_MANAGER_ADDRESS",
        "address",
        str,
        "host:port to listen on (port 0 picks one)",
    ),
    (
        "--database",
        "SESSION_MANAGER_DATABASE",
        "database",
        Path,
        "the SQLite file; created if missing",
    ),
    (
        "--engine",
        "SESSION_MANAGER_ENGINE",
        "engine",
        str,
        f"the WhatsApp engine: {', '.join(ENGINES)}",
    ),
    (
        "--devices-dir",
        "SESSION_MANAGER_DEVICES_DIR",
        "devices_dir",
        Path,
        "directory of each session's WhatsApp credentials (default: devices/ beside the database)",
    ),
    (
        "--dial-timeout",
        "SESSION_MANAGER_DIAL_TIMEOUT",
        "dial_timeout",
        float,
        "seconds an engine worker gets to reach WhatsApp before it is killed",
    ),
    (
        "--worker-heartbeat",
        "SESSION_MANAGER_WORKER_HEARTBEAT",
        "worker_heartbeat",
        float,
        "seconds between heartbeats to each engine worker; one silent for two is killed",
    ),
    (
        "--worker-crash-limit",
        "SESSION_MANAGER_WORKER_CRASH_LIMIT",
        "worker_crash_limit",
        int,
        "worker crashes within 5 minutes after which the session goes to error",
    ),
    ("--log-level", "SESSION_MANAGER_LOG_LEVEL", "log_level", str, "debug, info, warning or error"),
    (
        "--qr-timeout",
        "SESSION_MANAGER_QR_TIMEOUT",
        "qr_timeout",
        float,
        "seconds RequestQR waits for the engine's first code",
    ),
    (
        "--qr-first-seconds",
        "SESSION_MANAGER_QR_FIRST_SECONDS",
        "qr_first_seconds",
        float,
        "simulated engine: lifetime of the first code",
    ),
    (
        "--qr-rotation-seconds",
        "SESSION_MANAGER_QR_ROTATION_SECONDS",
        "qr_rotation_seconds",
        float,
        "simulated engine: lifetime of each later code",
    ),
    (
        "--qr-codes",
        "SESSION_MANAGER_QR_CODES",
        "qr_codes",
        int,
        "simulated engine: codes shown per pairing",
    ),
    (
        "--shutdown-grace",
        "SESSION_MANAGER_SHUTDOWN_GRACE",
        "shutdown_grace",
        float,
        "seconds in-flight calls get to finish on SIGTERM",
    ),
    (
        "--public-token-file",
        "SESSION_MANAGER_PUBLIC_TOKEN_FILE",
        "public_token_file",
        Path,
        "file with the token(s) of SessionService callers",
    ),
    (
        "--internal-token-file",
        "SESSION_MANAGER_INTERNAL_TOKEN_FILE",
        "internal_token_file",
        Path,
        "file with the token(s) of the engine side",
    ),
    (
        "--tls-cert",
        "SESSION_MANAGER_TLS_CERT",
        "tls_cert",
        Path,
        "PEM certificate chain; with --tls-key, serve TLS",
    ),
    ("--tls-key", "SESSION_MANAGER_TLS_KEY", "tls_key", Path, "PEM private key of --tls-cert"),
    (
        "--tls-client-ca",
        "SESSION_MANAGER_TLS_CLIENT_CA",
        "tls_client_ca",
        Path,
        "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    ),
    (
        "--send-rate",
        "SESSION_MANAGER_SEND_RATE",
        "send_rate",
        float,
        "messages per second each session may send on average (0: no limit)",
    ),
    (
        "--send-burst",
        "SESSION_MANAGER_SEND_BURST",
        "send_burst",
        int,
        "messages a session may send at once before the rate applies",
    ),
    (
        "--max-watchers-per-session",
        "SESSION_MANAGER_MAX_WATCHERS_PER_SESSION",
        "max_watchers_per_session",
        int,
        "open WatchSession streams per session",
    ),
    (
        "--max-watchers",
        "SESSION_MANAGER_MAX_WATCHERS",
        "max_watchers",
        int,
        "open WatchSession streams in all",
    ),
    (
        "--metrics-address",
        "SESSION_MANAGER_METRICS_ADDRESS",
        "metrics_address",
        str,
        "host:port to serve Prometheus /metrics on (off when empty)",
    ),
    (
        "--http-address",
        "SESSION_MANAGER_HTTP_ADDRESS",
        "http_address",
        str,
        "host:port of the HTTP/JSON API and its event streams (off when empty)",
    ),
    (
        "--cors-origins",
        "SESSION_MANAGER_CORS_ORIGINS",
        "cors_origins",
        str,
        "comma-separated browser origins allowed to call the HTTP API (CORS)",
    ),
    (
        "--sse-keepalive",
        "SESSION_MANAGER_SSE_KEEPALIVE",
        "sse_keepalive",
        float,
        "seconds between keep-alive comments on an idle event stream",
    ),
    (
        "--log-format",
        "SESSION_MANAGER_LOG_FORMAT",
        "log_format",
        str,
        "text (for people) or json (one object per line)",
    ),
)

_TRUE = {"1", "true", "yes", "on"}
_ORIGIN = re.compile(r"https?://[^/\s]+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for flag, env, name, kind, text in _OPTIONS:
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            help=f"{text} [env {env}, default {getattr(defaults, name)}]",
        )
    parser.add_argument(
        "--allow-unauthenticated-remote",
        action="store_true",
        default=None,
        help="listen on a non-loopback address without tokens, on purpose "
        "[env SESSION_MANAGER_ALLOW_UNAUTHENTICATED_REMOTE]",
    )


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for _, env, name, kind, _ in _OPTIONS:
        value = getattr(args, name, None)
        if value is None and env in environ:
            try:
                value = kind(environ[env])
            except ValueError as error:
                raise SystemExit(
                    f"{env}={environ[env]!r} is not a valid {kind.__name__}"
                ) from error
        if value is not None:
            values[name] = value
    allow = getattr(args, "allow_unauthenticated_remote", None)
    if allow is None:
        allow = environ.get("SESSION_MANAGER_ALLOW_UNAUTHENTICATED_REMOTE", "").lower() in _TRUE
    values["allow_unauthenticated_remote"] = allow
    values["public_tokens"] = _tokens(
        environ, "SESSION_MANAGER_PUBLIC_TOKEN", values.get("public_token_file")
    )
    values["internal_tokens"] = _tokens(
        environ, "SESSION_MANAGER_INTERNAL_TOKEN", values.get("internal_token_file")
    )
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.log_format not in ("text", "json"):
        raise SystemExit(f"unknown log format {settings.log_format!r}; choose text or json")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    for origin in settings.cors_origin_list:
        if not _ORIGIN.fullmatch(origin):
            raise SystemExit(
                f"--cors-origins: {origin!r} is not an origin like https://hub.example"
            )
    if settings.sse_keepalive <= 0:
        raise SystemExit("--sse-keepalive must be a positive number of seconds")
    if settings.engine not in ENGINES:
        raise SystemExit(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")
    return settings


def _tokens(environ: Mapping[str, str], env: str, file: object) -> tuple[bytes, ...]:
    text = environ.get(env, "")
    if isinstance(file, Path):
        try:
            text += "\n" + file.read_text()
        except OSError as error:
            raise SystemExit(f"cannot read the token file {file}: {error.strerror}") from error
    return parse_tokens(text)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
