"""Logging set-up: one stderr handler, JSON lines in pycti 7's format (the default) or plain
lines, and one filter that escapes control characters in every record (docs/telemetry.md).

pycti's format (``pycti/utils/opencti_logger.py``)::

    {"timestamp": "2026-12-07T01:02:03.456789Z", "level": "INFO", "name": "lis_async.app",
     "message": "...", "attributes": {...}}

``attributes`` holds the record's extra fields (pycti's ``meta``), the exception text
(``exc_info``) and the stack (``stack_info``); it is left out when empty, as pycti does.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from lis_async.redact import escape_controls, redact

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: What every LogRecord carries; anything else on a record is an extra field.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

PLAIN_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields; pycti's ``extra={"attributes": meta}`` is unwrapped."""
    out: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD:
            continue
        if key == "attributes" and isinstance(value, Mapping):
            out.update(value)
        else:
            out[key] = value
    return out


class PyctiJsonFormatter(logging.Formatter):
    """pycti 7's JSON lines (see the module docstring); the time is the record's, in UTC."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        doc: dict[str, Any] = {
            "timestamp": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.upper(),
            "name": record.name,
            "message": record.getMessage(),
        }
        attributes = extra_fields(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            attributes["exc_info"] = record.exc_text
        if record.stack_info:
            attributes["stack_info"] = self.formatStack(record.stack_info)
        if attributes:
            doc["attributes"] = attributes
        return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, Mapping):
        return {_escape(k): _escape(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_escape(v) for v in value]
    return value


def escaped_traceback(exc: BaseException) -> str:
    """The traceback as :meth:`logging.Formatter.formatException` writes it, secrets masked
    (:func:`lis_async.redact.redact`, before escaping: an escape must not glue a secret to a
    word), each exception's text escaped whole (its line breaks included: they are the
    exception's, not the traceback's) and the frames' lines escaped but for their own line
    breaks."""
    return "".join(_traceback_lines(traceback.TracebackException.from_exception(exc))).rstrip("\n")


def _traceback_lines(te: traceback.TracebackException) -> list[str]:
    out: list[str] = []
    if te.__cause__ is not None:
        out += [*_traceback_lines(te.__cause__), _CAUSE]
    elif te.__context__ is not None and not te.__suppress_context__:
        out += [*_traceback_lines(te.__context__), _CONTEXT]
    if te.stack:
        out.append("Traceback (most recent call last):\n")
        out += (escape_controls(redact(frame), keep="\n") for frame in te.stack.format())
    out += (
        escape_controls(redact(line.rstrip("\n"))) + "\n" for line in te.format_exception_only()
    )
    return out


_CAUSE: Final = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT: Final = "\nDuring handling of the above exception, another exception occurred:\n\n"


class EscapeControls(logging.Filter):
    """Escapes control, bidirectional and other invisible characters
    (:func:`lis_async.redact.escape_controls`) in the message, every extra field and the
    exception text of each record, before any format: a value from outside (a LastInfoSec
    error body, an OpenCTI error, an observable) can neither forge a line with ``\\r`` or
    ``\\n`` nor send terminal escapes nor reverse what a reader sees (U+202E). A traceback
    keeps its own line breaks. It runs after :class:`lis_async.redact.SecretFilter` (the
    traceback it builds again is masked the same way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it always does
            return True
        escaped = escape_controls(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        for key in record.__dict__.keys() - _STANDARD:
            setattr(record, key, _escape(record.__dict__[key]))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = escaped_traceback(record.exc_info[1])
        elif record.exc_text:
            record.exc_text = escape_controls(record.exc_text)
        if record.stack_info:
            record.stack_info = escape_controls(record.stack_info, keep="\n")
        return True


#: Third-party chatter stays at warning even in debug: their records may carry URLs.
THIRD_PARTY_LOGGERS: Final = ("aio_pika", "aiormq", "urllib3", "pycti", "api", "pika")


def setup_logging(level: str, json_lines: bool, filters: Iterable[logging.Filter] = ()) -> None:
    """One stderr handler on the root logger; ``filters`` go on the handler (the broker's
    :class:`~lis_async.broker.connection.ExpectedReconnection`, given by the CLI), then
    :class:`EscapeControls`."""
    handler = logging.StreamHandler(sys.stderr)
    for f in filters:
        handler.addFilter(f)
    handler.addFilter(EscapeControls())
    handler.setFormatter(PyctiJsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lis_async").setLevel(_LEVELS.get(level, logging.INFO))
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
