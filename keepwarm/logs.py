"""Logging: one event per line on stderr, as `key=value` text or as JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "keepwarm_fields"


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event with structured fields (never pass objects that hold the API key)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields}, stacklevel=2)


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """`2026-11-26T15:40:00.123Z INFO ping expert=x model=y result=warm ...`"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname, record.getMessage()]
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
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        doc.update({k: v for k, v in getattr(record, _FIELDS, {}).items() if v is not None})
        if record.exc_info:
            exc = record.exc_info[1]
            doc["exception"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send keepwarm's logs to stderr in `fmt` (`text` or `json`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The SDK's HTTP stack logs request details at debug; keep it quiet unless asked.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
