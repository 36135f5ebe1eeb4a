"""Logging set-up: plain text for people at a terminal, JSON lines for log shippers.

Only the entry point calls :func:`configure`. Modules log with ``logging.getLogger(__name__)`` and
pass identifiers (study/series/SOP instance UIDs, peer, AE titles) in ``extra=``; they are
rendered as ``key=value`` in text and as fields in JSON. Patient names never go in a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from ``extra=`` and is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for a terminal or journald."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        if extra:
            first, sep, rest = line.partition("\n")
            line = f"{first} {extra}{sep}{rest}"
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
    # pynetdicom logs every PDU at DEBUG and every association at INFO; keep it to warnings
    # unless the operator asked for DEBUG.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
    logging.getLogger("apscheduler").setLevel("WARNING")
    # Alembic announces each plugin and context at INFO on every start; migrations it applies
    # are still logged by node.queue.migrate.
    logging.getLogger("alembic").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
