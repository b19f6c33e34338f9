"""Log lines never carry what database errors quote (values from DETAIL and bound
parameters), while keeping where it happened and which error it was."""

from __future__ import annotations

import logging

from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from server.call_context import CallContext
from server.logs import DRIVER_LOGGERS, JsonFormatter, configure_logging

CANARY = "canary-value-8a1c"


def _integrity_error() -> IntegrityError:
    """A real SQLite error (the stdlib driver) whose message quotes the failing value."""
    engine = create_engine("sqlite://")  # a synchronous scratch engine, test-only
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE t (v TEXT CHECK (v <> :v))".replace(":v", f"'{CANARY}'")))
        try:
            conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": CANARY})
        except IntegrityError as exc:
            return exc
    raise AssertionError("the insert did not fail")


def test_a_logged_database_error_keeps_its_type_and_place_but_not_its_text() -> None:
    error = _integrity_error()
    assert CANARY in str(error)  # SQLAlchemy's own text would leak it
    try:
        raise RuntimeError("wrapping") from error
    except RuntimeError as wrapped:
        record = logging.LogRecord(
            "ferrule.errors",
            logging.ERROR,
            __file__,
            1,
            "unexpected error",
            None,
            (type(wrapped), wrapped, wrapped.__traceback__),
        )
    line = JsonFormatter().format(record)
    assert CANARY not in line
    assert "sqlalchemy.exc.IntegrityError" in line and "sqlite3.IntegrityError" in line
    assert "SQLITE_CONSTRAINT_CHECK" in line
    assert "test_log_redaction.py" in line  # the frames are still there
    assert "RuntimeError: wrapping" in line  # other exceptions keep their message


def test_driver_loggers_stay_quiet_at_debug() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved = {name: logging.getLogger(name).level for name in DRIVER_LOGGERS}
    try:
        configure_logging("DEBUG")
        assert root.level == logging.DEBUG
        for name in DRIVER_LOGGERS:
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_a_call_context_shown_anywhere_does_not_show_the_callers_token() -> None:
    call = CallContext(method="/m", metadata=(("authorization", "Bearer secret-token-42"),))
    assert "secret-token-42" not in repr(call)
    assert call.metadata == (("authorization", "Bearer secret-token-42"),)
