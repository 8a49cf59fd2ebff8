"""Logging set-up: one stderr handler, plain lines or JSON lines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, Final

import orjson

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "name": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # exc_text: set (redacted) by lis_async.redact.SecretFilter
            doc["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


#: Third-party chatter stays at warning even in debug: their records may carry URLs.
THIRD_PARTY_LOGGERS: Final = ("aio_pika", "aiormq", "urllib3", "pycti", "api", "pika")


def setup_logging(level: str, json_lines: bool, filters: Iterable[logging.Filter] = ()) -> None:
    """One stderr handler on the root logger; ``filters`` go on the handler (the broker's
    :class:`~lis_async.broker.connection.ExpectedReconnection`, given by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    for f in filters:
        handler.addFilter(f)
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lis_async").setLevel(_LEVELS.get(level, logging.INFO))
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
