"""``session-manager serve`` / ``python -m service serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from service import config
from service.server import InsecureAddress, serve


class _SessionFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        instance_id = getattr(record, "instance_id", None)
        return f"{line} instance_id={instance_id}" if instance_id else line


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
    _configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except InsecureAddress as error:
        print(f"session-manager: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
