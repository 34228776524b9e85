"""Log lines for people (text) and collectors (JSON), safe for any terminal.

Messages and extra fields often carry text from outside (an error message a
caller sent, a line a worker wrote on stderr). Control characters in them
would forge log lines or drive the reader's terminal, so every formatter
writes them escaped (``\\x1b``, ``\\u202e``); tracebacks are left as they are.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

# C0 and C1 controls, DEL, the line and paragraph separators, and the
# bidirectional overrides and isolates that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

#: The attributes every LogRecord has; anything else was passed as ``extra``.
#: ``color_message`` is uvicorn's terminal-coloured copy of the message.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape, so it stays one safe line."""
    return _UNSAFE.sub(_escaped, text)


def extras(record: logging.LogRecord) -> dict[str, str]:
    """The ``extra`` fields of a record, escaped, in the order they were given."""
    return {
        key: escape_controls(str(value))
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_") and value is not None
    }


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        line = super().formatMessage(record)
        fields = " ".join(f"{key}={value}" for key, value in extras(record).items())
        return f"{line} {fields}" if fields else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        for key, value in extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, style: str) -> None:
    """Log to stderr at ``level`` (debug, info, warning, error) as ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if style == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
