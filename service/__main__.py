"""``session-manager serve`` / ``python -m service serve``.

Every reason the server cannot start is one line on stderr
(``session-manager: ...``) and its own exit code (``startup.ExitCode``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from collections.abc import Sequence
from typing import NoReturn

import asyncpg

from service import config, logs
from service.api.http.server import ListenError
from service.server import serve
from service.startup import ExitCode, StartupError, database_failure
from service.store import failures

log = logging.getLogger("service")

_DATABASE_ERRORS = (
    sqlite3.Error,
    asyncpg.PostgresError,
    failures.DatabaseUnreachable,
    failures.DatabaseInUse,
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit code 2, like a bad setting."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.BAD_SETTING, f"session-manager: {message} (see --help)\n")


def _fail(code: ExitCode, message: str) -> int:
    print(f"session-manager: {logs.escape_controls(message)}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="session-manager", description="The Session Manager gRPC service.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve_parser = commands.add_parser("serve", help="run the server until SIGTERM or SIGINT")
    config.add_arguments(serve_parser)
    args = parser.parse_args(argv)
    try:
        settings = config.settings_from(args)
    except config.SettingError as error:
        return _fail(ExitCode.BAD_SETTING, str(error))
    except config.TokenFileUnreadable as error:
        return _fail(ExitCode.FILE_UNREADABLE, str(error))
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        return _fail(error.exit_code, str(error))
    except ListenError as error:  # the HTTP address failed after its trial bind passed
        return _fail(ExitCode.ADDRESS_UNUSABLE, str(error))
    except Exception as error:  # one line for the operator, the trace at debug
        if isinstance(error, _DATABASE_ERRORS):  # the database failed after it was opened
            failure = database_failure(settings.database, error)
            if failure is not None:
                return _fail(failure.exit_code, str(failure))
        log.debug("start-up failed", exc_info=error)
        return _fail(ExitCode.UNEXPECTED, f"unexpected failure: {type(error).__name__}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
