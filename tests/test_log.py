"""Log lines cannot be forged: control characters in any value are escaped (node/log.py)."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from node.log import JsonFormatter, TextFormatter, configure, escape

HOSTILE = "1.2.3\n2026-01-01 00:00:00,000 INFO    node.ingest.scp: forged\r\x00\x1b[31m\u2028"


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, logging.StreamHandler[io.StringIO]]]:
    logger = logging.getLogger("tests.log")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_escape() -> None:
    assert escape(HOSTILE) == ("1.2.3\\n2026-01-01 00:00:00,000 INFO    node.ingest.scp: forged"
                               "\\r\\x00\\x1b[31m\\u2028")
    assert escape("é ü 1.2.3\t") == "é ü 1.2.3\\t"
    assert escape(42) == "42"


def test_text_records_are_one_line_each(capture) -> None:  # type: ignore[no-untyped-def]
    logger, handler = capture
    handler.setFormatter(TextFormatter())
    logger.warning("instance refused: %s", HOSTILE, extra={"sop_uid": HOSTILE, "n": 3})
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logger.exception("failed", extra={"peer": "a\nb"})
    lines = handler.stream.getvalue().splitlines()
    assert lines[0].count("forged") == 2 and lines[0].endswith("n=3")
    assert "peer=a\\nb" in lines[1]
    assert all(line.startswith("    ") for line in lines[2:]), lines  # the traceback
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert "\x00" not in handler.stream.getvalue() and "\x1b" not in handler.stream.getvalue()


def test_json_values_are_escaped(capture) -> None:  # type: ignore[no-untyped-def]
    logger, handler = capture
    handler.setFormatter(JsonFormatter())
    logger.warning("refused %s", HOSTILE, extra={"sop_uid": HOSTILE, "n": 3, "ok": True,
                                                 "items": ["a\nb", 2]})
    record = json.loads(handler.stream.getvalue())
    assert record["message"] == "refused " + escape(HOSTILE)
    assert record["sop_uid"] == escape(HOSTILE)
    assert record["n"] == 3 and record["ok"] is True and record["items"] == ["a\\nb", 2]


def test_warnings_go_through_the_formatter() -> None:
    """pydicom warns about a peer's values with the values in the text."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        with warnings.catch_warnings():
            configure("INFO", "text")
            root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
            warnings.warn("value " + HOSTILE, UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    text = stream.getvalue()
    assert "py.warnings" in text and "value 1.2.3\\n2026-01-01" in text
    assert "\n2026-01-01" not in text and "\x00" not in text
