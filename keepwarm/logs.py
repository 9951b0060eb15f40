"""Logging: one event per line on stderr, as `key=value` text or as JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "keepwarm_fields"
DIGITS = 6  # significant digits of a float in a log line; metrics, ledger and json reports keep all
_formatter: logging.Formatter | None = None  # the one setup_logging installed


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event with structured fields (never pass objects that hold the API key)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields}, stacklevel=2)


def timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds, as both log formats write it: `2026-11-26T15:40:00.123Z`."""
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def rounded(value: float) -> float:
    """A float cut to DIGITS significant digits: `0.00041880000000000004` logs as `0.0004188`."""
    return float(f"{value:.{DIGITS}g}")


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.{DIGITS}g}"
    else:
        text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """`2026-11-26T15:40:00.123Z INFO ping expert=x model=y result=warm ...`"""

    def format(self, record: logging.LogRecord) -> str:
        # One event per line: a message with line breaks (a library's debug dump) keeps them escaped.
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        parts = [timestamp(record.created), record.levelname, message]
        fields = getattr(record, _FIELDS, {})
        parts += [f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None]
        if record.exc_info:
            # The exception type and message only: a formatted traceback can carry locals' reprs.
            exc = record.exc_info[1]
            parts.append(f"exception={_text_value(f'{type(exc).__name__}: {exc}')}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        doc.update(
            {k: rounded(v) if isinstance(v, float) else v for k, v in getattr(record, _FIELDS, {}).items() if v is not None}
        )
        if record.exc_info:
            exc = record.exc_info[1]
            doc["exception"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(doc, ensure_ascii=False, default=str)


def emergency_line(level: int, name: str, **fields: Any) -> bytes:
    """One event formatted as the log is, as bytes for `os.write` from a signal handler.

    A handler that interrupted a thread holding the logging lock must not log through it.
    """
    record = logging.LogRecord("keepwarm", level, __file__, 0, name, None, None)
    setattr(record, _FIELDS, fields)
    return ((_formatter or TextFormatter()).format(record) + "\n").encode("utf-8", "replace")


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send keepwarm's logs to stderr in `fmt` (`text` or `json`)."""
    global _formatter
    handler = logging.StreamHandler(sys.stderr)
    _formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(_formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # `-v` is keepwarm's debug: other libraries (tzlocal, the SDK's HTTP stack) stay at INFO and above.
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("keepwarm").setLevel(level)
    # The SDK's HTTP stack logs request details at debug; keep it quiet unless asked.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
