r"""Logging set-up: plain text for people at a terminal, JSON lines for log shippers.

Only the entry point calls :func:`configure`. Modules log with ``logging.getLogger(__name__)`` and
pass identifiers (study/series/SOP instance UIDs, peer, AE titles) in ``extra=``; they are
rendered as ``key=value`` in text and as fields in JSON. Patient names never go in a log line.

Values often come from peers (a SOP Instance UID, an AE title, pynetdicom's own lines about a
request): a newline in one wrote a forged ``INFO node.ingest.scp: ...`` line into the text log.
Both formatters escape every control character (C0, DEL, C1, and the Unicode line and
paragraph separators) in the message and in each field as ``\n``, ``\r``, ``\t`` or
``\xNN``/``\uNNNN``, so that one record is one line; a traceback keeps its own lines, each
indented in text so that none can pass for a record.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from ``extra=`` and is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = {
    code: _NAMED.get(chr(code), f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}
#: Indent of every line of a traceback in the text format.
TRACEBACK_INDENT = "    "


def escape(value: object) -> str:
    """``str(value)`` with every control character written as an escape (one line)."""
    return str(value).translate(_ESCAPES)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _json_value(value: Any) -> Any:
    """``value`` for a JSON line: numbers, booleans and None as they are, lists and mappings
    item by item, anything else as its escaped ``str``."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {escape(k): _json_value(v) for k, v in value.items()}
    return escape(value)


def _traceback_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The record's traceback (and stack), control characters other than its line breaks
    escaped ('' when it has none)."""
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(escape(line) for part in parts for line in part.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        out.update(_json_value(_fields(record)))
        exception = _traceback_text(self, record)
        if exception:
            out["exception"] = exception
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for a terminal or journald."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = " ".join(f"{escape(k)}={escape(v)}" for k, v in _fields(record).items())
        if extra:
            line = f"{line} {extra}"
        exception = _traceback_text(self, record)
        if exception:
            line += "\n" + "\n".join(TRACEBACK_INDENT + part for part in exception.split("\n"))
        return line


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger (replacing earlier ones)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings print straight to stderr, past the formatter and its escaping (pydicom
    # warns about a peer's values with the values in the text): they go through logging
    # instead. pydicom logs each of its warnings itself, so its warnings are not repeated.
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    # pynetdicom logs every PDU at DEBUG and every association at INFO; keep it to warnings
    # unless the operator asked for DEBUG.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
    logging.getLogger("apscheduler").setLevel("WARNING")
    # highdicom announces every module it copies into a report, some 20 lines per report.
    logging.getLogger("highdicom").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
    # Alembic announces each plugin and context at INFO on every start; migrations it applies
    # are still logged by node.queue.migrate.
    logging.getLogger("alembic").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
