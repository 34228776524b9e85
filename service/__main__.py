"""``session-manager serve`` / ``python -m service serve``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from service import config
from service.api.http.server import ListenError
from service.server import InsecureAddress, serve


class _SessionFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        instance_id = getattr(record, "instance_id", None)
        return f"{line} instance_id={instance_id}" if instance_id else line


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        instance_id = getattr(record, "instance_id", None)
        if instance_id:
            line["instance_id"] = instance_id
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _configure_logging(level: str, style: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_SessionFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="session-manager", description="The Session Manager gRPC service."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the server until SIGTERM or SIGINT")
    config.add_arguments(serve_parser)
    args = parser.parse_args(argv)
    settings = config.settings_from(args)
    _configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (InsecureAddress, ListenError) as error:
        print(f"session-manager: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
