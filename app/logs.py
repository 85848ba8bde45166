"""Log setup shared by the API, gunicorn and the Celery processes.

LOG_FORMAT=json writes one JSON object per line. Fields passed with `extra=` (the
notification_id that ingest, the stream consumer, delivery and the gateway attach) become
keys of that object, so one notification can be followed across every process with a grep
or a log query. The platform's own loggers (`app.*`, `tasks.*`) log at LOG_LEVEL;
LOG_LEVEL=DEBUG adds one line per notification at each step. Everything else stays at
INFO or above, whatever LOG_LEVEL says, so DEBUG does not bring the libraries' chatter.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

OWN_LOGGERS = ("app", "tasks", "models")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the extras, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """The plain format, with the extras appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str, root_level: str | int | None = None) -> None:
    """Route every log record to stderr in `fmt`; the platform's loggers at `level`.

    `root_level` is the level of everything else (Celery passes its `-l`); by default
    `level`, but never below INFO.
    """
    own = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if root_level is None:
        root_level = max(own, logging.INFO) if isinstance(own, int) else logging.INFO
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_notifier", False)), None)
    if handler is None and not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler._notifier = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if handler is not None:
        handler.setFormatter(formatter(fmt))
    root.setLevel(root_level)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
