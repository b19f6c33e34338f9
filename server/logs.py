"""Structured JSON logs: one object per line, with the RPC's method and trace id if any."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
