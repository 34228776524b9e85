"""The server's settings: flags, then environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("simulated",)


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "127.0.0.1:50051"
    database: Path = Path("data/sessions.db")
    engine: str = "simulated"
    log_level: str = "info"
    qr_timeout: float = 30.0
    qr_first_seconds: float = 60.0
    qr_rotation_seconds: float = 20.0
    qr_codes: int = 6
    shutdown_grace: float = 10.0


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
)


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
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.engine not in ENGINES:
        raise SystemExit(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")
    return settings


def parse(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(argv))
