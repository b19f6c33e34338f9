"""Structured JSON logs: one object per line, with the RPC's method and trace id if any."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

from db.error_translation import DATABASE_ERRORS
from server.call_context import maybe_current_call


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = maybe_current_call()
        if call is not None:
            entry["rpc.method"] = call.method
            if call.trace_id:
                entry["trace_id"] = call.trace_id
            if call.organization_id:
                entry["tenant"] = call.organization_id
        extra = getattr(record, "ferrule", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def formatException(self, ei: Any) -> str:
        exc = ei[1] if isinstance(ei, tuple) else None
        if not isinstance(exc, BaseException):
            return super().formatException(ei)
        return format_exception_safely(exc)


def format_exception_safely(exc: BaseException) -> str:
    """The traceback of ``exc`` and its causes, with database errors' messages withheld
    (type and SQLSTATE kept): stack frames say where, and the values stay out of logs."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    parts: list[str] = []
    for link in reversed(chain):
        if parts:
            parts.append("\nwhich led to:\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(link.__traceback__))
        kind = f"{type(link).__module__}.{type(link).__qualname__}"
        parts.append(f"{kind}: {_message_of(link)}\n")
    return "".join(parts).rstrip("\n")


def _message_of(exc: BaseException) -> str:
    if not isinstance(exc, DATABASE_ERRORS):
        return str(exc)
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(exc, "sqlstate", None) or getattr(orig, "sqlstate", None)
    name = getattr(exc, "sqlite_errorname", None) or getattr(orig, "sqlite_errorname", None)
    code = f" (SQLSTATE {sqlstate})" if sqlstate else f" ({name})" if name else ""
    return f"<database message withheld: it may quote values>{code}"


#: Database drivers' loggers print statements with their parameters and result rows at
#: INFO/DEBUG (aiosqlite logs every call with its arguments): password hashes, emails,
#: session token digests. They stay at WARNING whatever FERRULE_LOG_LEVEL says; Ferrule's
#: own statement logging (slow statements) carries normalized text only.
DRIVER_LOGGERS = ("aiosqlite", "asyncmy", "asyncpg", "sqlalchemy")


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
