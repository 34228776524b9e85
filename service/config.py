"""The server's settings: flags, then environment variables, then defaults.

Each setting is declared once, as a field of ``Settings``: its flag
(``--send-rate``) and environment variable (``SESSION_MANAGER_SEND_RATE``)
follow from the field's name, its type from the annotation, and its help and
checks from the field's metadata. ``Settings`` checks every value when it is
built, so no code path can start a server on a value it cannot use.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import math
import os
import re
import socket
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.domain import contract
from service.store import postgres

ENGINES = ("simulated", "simulated-worker", "whatsmeow")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
ENV_PREFIX = "SESSION_MANAGER_"
#: The longest duration any setting accepts (one year, in seconds): longer ones overflow dates.
MAX_SECONDS = 365 * 24 * 3600.0

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_ORIGIN = re.compile(r"https?://[^/\s]+")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")

#: The credentials' folder when the database is a server: where the default SQLite file keeps them.
DEVICES_WITH_POSTGRES = Path("data/devices")


class PostgresURL(str):
    """A ``postgresql://`` URL given as ``--database``: the sessions live in that server.

    It may hold a password: show it with ``service.store.postgres.display``.
    """


#: A check returns what is wrong with a value, or None when it is fine.
Check = Callable[[Any], str | None]


class SettingError(ValueError):
    """A setting the server cannot use; ``name`` is the field, the message says why."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(problem)
        self.name = name
        self.problem = problem


class TokenFileUnreadable(OSError):
    """A token file named by the settings cannot be read."""


def seconds(value: float) -> str | None:
    """A duration: above 0, and short enough for any date it is added to."""
    if not 0 < value <= MAX_SECONDS:
        return f"must be a number of seconds above 0 and at most {MAX_SECONDS:.0f}, got {value}"
    return None


def rate(value: float) -> str | None:
    """A rate where 0 means "no limit"."""
    return None if value >= 0 else f"must be 0 (no limit) or more, got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be above 0, got {value}"


def node_name(value: str) -> str | None:
    if not _NODE_ID.fullmatch(value):
        return f"must be 1-63 letters, digits, '.', '_' or '-', got {value!r}"
    return None


def count(value: int) -> str | None:
    """A count or a limit: at least one."""
    return None if value >= 1 else f"must be 1 or more, got {value}"


def host_port(value: str) -> str | None:
    """``host:port`` with a host (gRPC would take ``:50051`` or a bare host as port 443)."""
    match = _ADDRESS.fullmatch(value)
    if match is None:
        return f"must be host:port (e.g. 127.0.0.1:50051 or [::1]:50051), got {value!r}"
    if int(match.group(2)) > 65535:
        return f"port must be 0 (any free port) or 1-65535, got {match.group(2)}"
    return None


def optional_host_port(value: str) -> str | None:
    return None if value == "" else host_port(value)


def database_location(value: Path | PostgresURL) -> str | None:
    if not isinstance(value, PostgresURL):
        return None
    try:
        _ = urlsplit(value).port  # a port that is not a number, a broken [v6] host
    except ValueError as error:
        return f"is not a usable PostgreSQL URL: {error}"
    return None


def _origin_list(value: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in value.split(",") if origin.strip())


def origins(value: str) -> str | None:
    """Browser origins, comma-separated: ``https://hub.example`` (a scheme and a host only)."""
    for origin in _origin_list(value):
        if not _ORIGIN.fullmatch(origin):
            return f"{origin!r} is not an origin like https://hub.example"
    return None


def optional_instance_id(value: str) -> str | None:
    """Empty (off), or an ``instance_id`` as the contract allows it."""
    if value and not re.fullmatch(contract.INSTANCE_ID_PATTERN, value):
        return f"must be an instance_id (1-64 of [A-Za-z0-9_.-], not starting with _ . -), got {value!r}"
    return None


def comma_list(value: str) -> tuple[str, ...]:
    """The items of a comma-separated setting, blanks dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def host_names(value: str) -> str | None:
    """Host names, comma-separated: ``sm.example`` or ``*.example`` for every subdomain."""
    for name in comma_list(value):
        if not _HOST_NAME.fullmatch(name):
            return f"{name!r} is not a host name like sm.example or *.example (no port, no scheme)"
    return None


def networks(value: str) -> str | None:
    """IP addresses or networks, comma-separated: ``10.0.0.5``, ``10.0.0.0/8``, ``::1``."""
    for item in comma_list(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP address or network like 10.0.0.5 or 10.0.0.0/8"
    return None


def automatic_or_count(value: int) -> str | None:
    return None if value >= 0 else f"must be 0 (automatic) or more, got {value}"


def one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def setting(default: Any, help: str, check: Check | None = None, *, option: bool = True) -> Any:
    """A field of ``Settings``; ``option=False`` for values that are not flags of their own."""
    return field(default=default, metadata={"help": help, "check": check, "option": option})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server is told at start-up; checked when built, whoever builds it."""

    address: str = setting(
        "127.0.0.1:50051", "host:port to listen on (port 0 picks one)", host_port
    )
    database: Path | PostgresURL = setting(
        Path("data/sessions.db"),
        "the SQLite file (created if missing), or a postgresql://user@host/db URL",
        database_location,
    )
    engine: str = setting(
        "whatsmeow", f"the WhatsApp engine: {', '.join(ENGINES)}", one_of(*ENGINES)
    )
    #: Where each session's WhatsApp credentials live; default: ``devices`` beside the database.
    devices_dir: Path | None = setting(
        None,
        "directory of each session's WhatsApp credentials (default: devices/ beside the "
        "SQLite file; data/devices with PostgreSQL)",
    )
    dial_timeout: float = setting(
        30.0, "seconds an engine worker gets to reach WhatsApp before it is killed", seconds
    )
    worker_heartbeat: float = setting(
        5.0,
        "seconds between heartbeats to each engine worker; one silent for two is killed",
        seconds,
    )
    worker_crash_limit: int = setting(
        5, "worker crashes within 5 minutes after which the session goes to error", count
    )
    log_level: str = setting("info", "debug, info, warning or error", one_of(*LOG_LEVELS))
    qr_timeout: float = setting(
        30.0, "seconds RequestQR waits for the engine's first code", seconds
    )
    qr_first_seconds: float = setting(60.0, "simulated engine: lifetime of the first code", seconds)
    qr_rotation_seconds: float = setting(
        20.0, "simulated engine: lifetime of each later code", seconds
    )
    qr_codes: int = setting(6, "simulated engine: codes shown per pairing", count)
    shutdown_grace: float = setting(
        10.0, "seconds in-flight calls get to finish on SIGTERM", seconds
    )
    metrics_address: str = setting(
        "", "host:port to serve Prometheus /metrics on (off when empty)", optional_host_port
    )
    log_format: str = setting(
        "text", "text (for people) or json (one object per line)", one_of(*LOG_FORMATS)
    )
    send_rate: float = setting(
        5.0, "messages per second each session may send on average (0: no limit)", rate
    )
    send_burst: int = setting(
        20, "messages a session may send at once before the rate applies", count
    )
    max_watchers_per_session: int = setting(100, "open WatchSession streams per session", count)
    max_watchers: int = setting(20_000, "open WatchSession streams in all", count)
    public_token_file: Path | None = setting(
        None, "file with the token(s) of SessionService callers"
    )
    internal_token_file: Path | None = setting(None, "file with the token(s) of the engine side")
    tls_cert: Path | None = setting(None, "PEM certificate chain; with --tls-key, serve TLS")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(
        None, "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    allow_unauthenticated_remote: bool = setting(
        False, "listen on a non-loopback address without tokens, on purpose"
    )
    #: Read from SESSION_MANAGER_PUBLIC_TOKEN / _INTERNAL_TOKEN or the token files.
    public_tokens: tuple[bytes, ...] = setting((), "tokens of SessionService callers", option=False)
    internal_tokens: tuple[bytes, ...] = setting((), "tokens of the engine side", option=False)
    http_address: str = setting(
        "127.0.0.1:8080",
        "host:port of the HTTP/JSON API and its event streams (off when empty)",
        optional_host_port,
    )
    cors_origins: str = setting(
        "", "comma-separated browser origins allowed to call the HTTP API (CORS)", origins
    )
    sse_keepalive: float = setting(
        15.0, "seconds between keep-alive comments on an idle event stream", seconds
    )
    http_allowed_hosts: str = setting(
        "",
        "comma-separated host names the HTTP API answers to, besides localhost and IP "
        "addresses (*.example for every subdomain); any other Host header gets 400",
        host_names,
    )
    forwarded_allow_ips: str = setting(
        "",
        "comma-separated addresses or networks of proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto the HTTP API believes (none when empty)",
        networks,
    )
    http_read_timeout: float = setting(
        10.0,
        "seconds an HTTP client gets to send a request's headers, then again its body",
        seconds,
    )
    http_idle_timeout: float = setting(
        5.0, "seconds an HTTP connection may stay open with no request", seconds
    )
    http_max_connections: int = setting(
        0,
        "open HTTP connections at most (0: half of the file descriptors free at start-up)",
        automatic_or_count,
    )
    http_streams_per_client: int = setting(
        10,
        "event streams of one session that one client (its token and address) may hold; "
        "at most half of --max-watchers-per-session",
        count,
    )
    event_retention: float = setting(
        7 * 24 * 3600.0,
        "seconds the event log keeps each event: a list-wide stream resumes within it",
        seconds,
    )
    legacy_instance: str = setting(
        "",
        "serve the deprecated single-session routes of the old service (/status, /qr, "
        "/connect, /disconnect, /send) for this instance_id (off when empty)",
        optional_instance_id,
    )
    # Several nodes over one PostgreSQL database (docs/storage-and-nodes.md, Running several nodes).
    node_id: str = setting(
        socket.gethostname(),
        "with PostgreSQL: this node's name, unique among the nodes of one database",
        node_name,
    )
    node_address: str = setting(
        "",
        "with PostgreSQL: host:port where the other nodes reach this node's gRPC server "
        "(default: --address, with the port it got)",
        optional_host_port,
    )
    lease_ttl: float = setting(
        15.0, "with PostgreSQL: seconds a node's lease on its sessions lasts unrenewed", seconds
    )
    lease_grace: float = setting(
        5.0, "with PostgreSQL: seconds a new owner waits past an expired lease", seconds
    )
    moves_per_second: float = setting(
        10.0, "with PostgreSQL: sessions a node takes over or hands over per second", positive
    )

    def __post_init__(self) -> None:
        for declared in fields(self):
            value = getattr(self, declared.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingError(declared.name, f"must be a finite number, got {value}")
            check: Check | None = declared.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem is not None:
                raise SettingError(declared.name, problem)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingError("tls_key" if self.tls_key is None else "tls_cert",
                               "--tls-cert and --tls-key go together")  # fmt: skip
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingError("tls_client_ca", "needs --tls-cert and --tls-key")

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return _origin_list(self.cors_origins)

    @property
    def http_allowed_host_list(self) -> tuple[str, ...]:
        return tuple(name.lower() for name in comma_list(self.http_allowed_hosts))

    @property
    def forwarded_allow_ip_list(self) -> tuple[str, ...]:
        return comma_list(self.forwarded_allow_ips)

    @property
    def devices_path(self) -> Path:
        if self.devices_dir is not None:
            return self.devices_dir
        if isinstance(self.database, PostgresURL):
            return DEVICES_WITH_POSTGRES
        return self.database.parent / "devices"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@functools.cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def options() -> Iterator[Field[Any]]:
    """The fields that have a flag and an environment variable of their own."""
    return (declared for declared in fields(Settings) if declared.metadata["option"])


def _kind(name: str) -> type:
    """The type a setting's text is parsed into: ``Path | None`` parses as ``Path``."""
    kind = _types()[name]
    arguments = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return typing.cast(type, arguments[0] if arguments else kind)


def parse(name: str, text: str) -> object:
    """A setting's value from its text on the command line or in the environment."""
    kind = _kind(name)
    if PostgresURL in typing.get_args(_types()[name]) and postgres.is_url(text):
        return PostgresURL(text)
    if kind is bool:
        if text.lower() not in _TRUE | _FALSE:
            raise SettingError(name, f"must be true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind is Path and not text:
        raise SettingError(name, "must not be empty")
    try:
        return kind(text.strip() if kind in (int, float) else text)
    except ValueError:
        raise SettingError(name, f"must be {_article(kind)}, got {text!r}") from None


def _article(kind: type) -> str:
    return {int: "a whole number", float: "a number"}.get(kind, f"a {kind.__name__}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, read as text: ``settings_from`` parses and checks it."""
    defaults = Settings()
    for declared in options():
        name = declared.name
        default = getattr(defaults, name)
        shown = "off" if default in ("", None, False) else default
        text = f"{declared.metadata['help']} [env {env_name(name)}, default {shown}]"
        if _kind(name) is bool:
            parser.add_argument(
                flag(name), dest=name, action="store_const", const="true", help=text
            )
        else:
            parser.add_argument(
                flag(name), dest=name, default=None, metavar=name.upper(), help=text
            )


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of the flags in ``args``, then of the environment, then the defaults.

    Raises SettingError whose message names the flag or variable the bad value came from.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for declared in options():
        name = declared.name
        text = getattr(args, name, None)
        source = flag(name)
        if text is None and env_name(name) in environ:
            text, source = environ[env_name(name)], env_name(name)
        if text is not None:
            sources[name] = source
            try:
                values[name] = parse(name, text)
            except SettingError as error:
                raise SettingError(name, f"{source}: {error.problem}") from None
    values["public_tokens"] = _tokens(environ, "PUBLIC", values.get("public_token_file"))
    values["internal_tokens"] = _tokens(environ, "INTERNAL", values.get("internal_token_file"))
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except SettingError as error:
        source = sources.get(error.name, flag(error.name))
        raise SettingError(error.name, f"{source}: {error.problem}") from None


def _tokens(environ: Mapping[str, str], role: str, file: object) -> tuple[bytes, ...]:
    text = environ.get(f"{ENV_PREFIX}{role}_TOKEN", "")
    if isinstance(file, Path):
        try:
            text += "\n" + file.read_text()
        except OSError as error:
            raise TokenFileUnreadable(
                f"cannot read the token file {file}: {error.strerror}"
            ) from error
    return parse_tokens(text)


def parse_tokens(text: str) -> tuple[bytes, ...]:
    """Tokens from an environment variable or file: comma- or newline-separated."""
    return tuple(
        token.strip().encode() for token in text.replace("\n", ",").split(",") if token.strip()
    )
