"""Driver and SQLAlchemy errors -> the typed domain errors of :mod:`db.errors`, in one place.

Every driver is covered: asyncpg reports SQLSTATEs and constraint names; asyncmy
(MySQL/MariaDB) reports error numbers and a message naming the key, constraint or column;
sqlite3 reports extended error names and a message naming the table, column or
constraint. Nothing of the SQL text or parameter values is carried into the domain error
(MySQL's duplicate-key message quotes the duplicate value: only the key name is read).

Data errors are the backstop behind the input boundary (server/input_boundary.py): a value
the database cannot hold (PostgreSQL's SQLSTATE class 22, MySQL's data error numbers,
asyncpg refusing to encode a parameter, sqlite3 refusing to bind one) is the caller's bad
input, INVALID_ARGUMENT, never INTERNAL. Each driver's section maps its codes onto
:func:`_data_error`.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3

import asyncmy.errors
import asyncpg
from sqlalchemy import exc as sa_exc

from db.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    ConcurrentModificationError,
    DatabaseUnavailableError,
    DomainError,
    FailedPreconditionError,
    FieldViolation,
    StatementTimeoutError,
    ValidationError,
)

#: Exceptions whose text can quote stored or bound values: a driver's DETAIL ("Failing
#: row contains (...)", "Key (email)=(...)"), or SQLAlchemy's statement wrapper around
#: it. Logs withhold their messages (server/logs.py).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.StatementError,
    asyncpg.PostgresError,
    asyncmy.errors.Error,
    sqlite3.Error,
)

#: Table -> resource type named in NotFound / AlreadyExists errors: the full name of the
#: resource's message (AIP-193); the two tables that back no resource of the API keep a
#: name of the same form (their conflicts are handled before they could reach a caller).
RESOURCE_TYPES: dict[str, str] = {
    "organizations": "ferrule.v1.Organization",
    "users": "ferrule.v1.User",
    "user_profiles": "ferrule.v1.User",
    "user_sessions": "ferrule.v1.UserSession",
    "analysis_batches": "ferrule.v1.AnalysisBatch",
    "text_analyses": "ferrule.v1.Analysis",
    "model_performance_records": "ferrule.v1.ModelPerformance",
    "predictions": "ferrule.v1.Prediction",
    "request_log": "ferrule.v1.RequestLog",
    "ingest_batches": "ferrule.v1.IngestBatch",
    "idempotency_keys": "ferrule.v1.IdempotencyKey",
}
#: The resource types above that name no message of the API.
INTERNAL_RECORDS = frozenset({"ferrule.v1.IngestBatch", "ferrule.v1.IdempotencyKey"})

#: CHECK constraints whose suffix is not simply the column they guard.
_CHECK_FIELDS: dict[str, str] = {
    "password_required": "password",
    "email_lower_case": "email",
    "expires_after_creation": "expire_time",
    "window_ordered": "window_end",
    "counts_consistent": "error_count",
    "costs_non_negative": "mean_latency_ms",
    "processing_ms_non_negative": "processing_ms",
}

_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "53400"})
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


def _data_error(description: str, column: str | None = None) -> ValidationError:
    """A value the database refused as data; the field is the column when the driver names
    it, else the request as a whole (the boundary names fields; this is its backstop)."""
    return ValidationError([FieldViolation(column or "request", description)])


#: SQLSTATE class 22 (data exception) subclasses worth their own words; the rest of the
#: class gets the generic description.
_PG_DATA_DESCRIPTIONS: dict[str, str] = {
    "22001": "a text value is longer than its column allows",
    "22003": "a number is out of the range its column holds",
    "22007": "a date or time value is not valid",
    "22008": "a date or time value is out of range",
    "22021": "a text value contains a character the database cannot store (such as U+0000)",
    "22P05": "a text value contains a character the database cannot store (such as U+0000)",
    "22P02": "a value is not valid for its type",
    "2202E": "an array index is out of range",
    "22012": "a division by zero",
}
_DATA_ERROR = "a value cannot be stored or compared by the database"


def _sqlstate(orig: BaseException) -> str | None:
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


def _pg_detail(orig: BaseException, attribute: str) -> str | None:
    # SQLAlchemy's asyncpg adapter chains the asyncpg exception, which carries the details.
    value = getattr(orig.__cause__, attribute, None) or getattr(orig, attribute, None)
    return value if isinstance(value, str) else None


def _table_of(constraint: str | None, table: str | None) -> str | None:
    if table:
        return table
    if not constraint:
        return None
    # Naming convention: <prefix>_<table>_...; the longest matching table wins.
    body = constraint.split("_", 1)[1] if "_" in constraint else constraint
    matches = [t for t in RESOURCE_TYPES if body.startswith(t + "_") or body == t]
    return max(matches, key=len) if matches else None


def _check_field(constraint: str | None, table: str | None) -> str:
    if not constraint:
        return "unknown"
    suffix = constraint
    if table and constraint.startswith(f"ck_{table}_"):
        suffix = constraint[len(f"ck_{table}_") :]
    return _CHECK_FIELDS.get(suffix, suffix)


def _integrity(
    kind: str, constraint: str | None, table: str | None, column: str | None
) -> DomainError:
    table = _table_of(constraint, table)
    resource = RESOURCE_TYPES.get(table or "", "Resource")
    if kind == "unique":
        return AlreadyExistsError(resource, constraint or "unique key")
    if kind == "check":
        field = _check_field(constraint, table)
        return ValidationError([FieldViolation(field, "value is out of the allowed range")])
    if kind == "not_null":
        return ValidationError([FieldViolation(column or "unknown", "a value is required")])
    if kind == "foreign_key":
        return FailedPreconditionError(f"a resource referenced by this {resource} does not exist")
    return FailedPreconditionError(f"{resource} violates a constraint")


_PG_INTEGRITY = {"23505": "unique", "23514": "check", "23502": "not_null", "23503": "foreign_key"}


def _from_postgres(orig: BaseException) -> DomainError | None:
    state = _sqlstate(orig)
    if state is None:
        return None
    if state in _PG_INTEGRITY:
        return _integrity(
            _PG_INTEGRITY[state],
            _pg_detail(orig, "constraint_name"),
            _pg_detail(orig, "table_name"),
            _pg_detail(orig, "column_name"),
        )
    if state.startswith("22"):
        # asyncpg's own encoding errors arrive as SQLSTATE 22000 and name the parameter's
        # value in their text: only the fixed description is carried.
        return _data_error(
            _PG_DATA_DESCRIPTIONS.get(state, _DATA_ERROR), _pg_detail(orig, "column_name")
        )
    if state == "57014":
        return StatementTimeoutError("the statement ran past its deadline and was cancelled")
    if state.startswith("08") or state in _UNAVAILABLE_SQLSTATES:
        return DatabaseUnavailableError("the database connection failed")
    if state == "42501":
        return AccessDeniedError("the row is outside the caller's organization")
    if state in _CONFLICT_SQLSTATES:
        return ConcurrentModificationError("a concurrent transaction conflicted; retry")
    return None


_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (?:index '(?P<index>\w+)'|(?P<cols>.+))")
_SQLITE_CHECK = re.compile(r"CHECK constraint failed: (?P<name>\w+)")
_SQLITE_NOT_NULL = re.compile(r"NOT NULL constraint failed: (?P<table>\w+)\.(?P<column>\w+)")


_SQLITE_DATA_DESCRIPTIONS: dict[str, str] = {
    "SQLITE_TOOBIG": "a value is larger than the database accepts",
    "SQLITE_MISMATCH": "a value does not match its column's type",
    "SQLITE_RANGE": "a value is out of range",
}


def _from_sqlite(orig: sqlite3.Error) -> DomainError | None:
    name = getattr(orig, "sqlite_errorname", "") or ""
    message = str(orig)
    if name in {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}:
        match = _SQLITE_UNIQUE.search(message)
        index = match.group("index") if match else None
        cols = match.group("cols") if match else None
        table = cols.split(".", 1)[0] if cols else None
        return _integrity("unique", index, table, None)
    if name == "SQLITE_CONSTRAINT_CHECK":
        match = _SQLITE_CHECK.search(message)
        return _integrity("check", match.group("name") if match else None, None, None)
    if name == "SQLITE_CONSTRAINT_NOTNULL":
        match = _SQLITE_NOT_NULL.search(message)
        table = match.group("table") if match else None
        return _integrity("not_null", None, table, match.group("column") if match else None)
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        return _integrity("foreign_key", None, None, None)
    if name in _SQLITE_DATA_DESCRIPTIONS:
        return _data_error(_SQLITE_DATA_DESCRIPTIONS[name])
    if isinstance(orig, sqlite3.DataError):
        return _data_error(_DATA_ERROR)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return DatabaseUnavailableError("the database is busy; retry")
    if name == "SQLITE_INTERRUPT":
        return StatementTimeoutError("the statement ran past its deadline and was cancelled")
    return None


_MYSQL_DUPLICATE_KEY = re.compile(r"for key '(?:\w+\.)?(?P<key>\w+)'")
_MYSQL_WRITTEN_TABLE = re.compile(
    r"^\s*(?:/\*.*?\*/\s*)?(?:INSERT|UPDATE)\s+(?:IGNORE\s+)?(?:INTO\s+)?`?(?P<table>\w+)`?",
    re.IGNORECASE | re.DOTALL,
)
_MYSQL_CHECK = re.compile(r"(?:CONSTRAINT `|[Cc]heck constraint ')(?P<name>\w+)")
_MYSQL_COLUMN = re.compile(r"[Cc]olumn '(?P<column>\w+)'")

#: Error numbers (MySQL and MariaDB share them unless noted).
_MYSQL_UNIQUE = frozenset({1062, 1586})  # ER_DUP_ENTRY, ER_DUP_ENTRY_WITH_KEY_NAME
_MYSQL_CHECK_FAILED = frozenset({4025, 3819})  # MariaDB, MySQL
_MYSQL_NOT_NULL = frozenset({1048, 1364})  # ER_BAD_NULL_ERROR, ER_NO_DEFAULT_FOR_FIELD
_MYSQL_FOREIGN_KEY = frozenset({1216, 1217, 1451, 1452})
#: ER_STATEMENT_TIMEOUT (MariaDB max_statement_time), ER_QUERY_TIMEOUT (MySQL
#: max_execution_time), ER_QUERY_INTERRUPTED (KILL QUERY after a cancelled RPC).
_MYSQL_TIMEOUT = frozenset({1969, 3024, 1317})
_MYSQL_CONFLICT = frozenset({1213, 1205})  # deadlock, lock wait timeout
_MYSQL_UNAVAILABLE = frozenset(
    {1040, 1053, 1927, 2002, 2003, 2006, 2013, 2055}
)  # too many connections, shutdown, connection killed, cannot connect, gone away, lost
_MYSQL_ACCESS_DENIED = frozenset({1044, 1045, 1142, 1143})
#: MySQL/MariaDB data errors (strict mode makes them errors rather than clipped values).
_MYSQL_DATA_DESCRIPTIONS: dict[int, str] = {
    1406: "a text value is longer than its column allows",  # ER_DATA_TOO_LONG
    1264: "a number is out of the range its column holds",  # ER_WARN_DATA_OUT_OF_RANGE
    1366: "a value is not valid for its column (such as text the character set cannot hold)",
    1292: "a value is not valid for its type (a date, time or UUID)",  # ER_TRUNCATED_WRONG_VALUE
    1265: "a value was truncated to fit its column",  # WARN_DATA_TRUNCATED
    1367: "a value is not valid for its column",  # ER_ILLEGAL_VALUE_FOR_TYPE
    1411: "a value is not valid for its type",  # ER_WRONG_VALUE_FOR_TYPE
    1365: "a division by zero",  # ER_DIVISION_BY_ZERO
    3140: "a JSON document is not valid",  # MySQL ER_INVALID_JSON_TEXT
    4038: "a JSON document is not valid",  # MariaDB ER_JSON_SYNTAX
    1690: "a number is out of the range the database computes with",  # ER_DATA_OUT_OF_RANGE
}
_MYSQL_DATA_COLUMN = re.compile(r"for column '?`?(?:\w+`?\.`?)*(?P<column>\w+)`?'?")


def _mysql_errno(orig: BaseException) -> int | None:
    errno = orig.args[0] if orig.args else None
    return errno if isinstance(errno, int) else None


def _from_mysql(orig: BaseException, statement: str | None = None) -> DomainError | None:
    errno = _mysql_errno(orig)
    if errno is None:
        return None
    message = str(orig.args[1]) if len(orig.args) > 1 else ""
    if errno in _MYSQL_UNIQUE:
        match = _MYSQL_DUPLICATE_KEY.search(message)
        key = match.group("key") if match else None
        if key == "PRIMARY":  # named by no convention: the table is the one written to
            target = _MYSQL_WRITTEN_TABLE.search(statement or "")
            return _integrity("unique", None, target.group("table") if target else None, None)
        return _integrity("unique", key, None, None)
    if errno in _MYSQL_CHECK_FAILED:
        match = _MYSQL_CHECK.search(message)
        return _integrity("check", match.group("name") if match else None, None, None)
    if errno in _MYSQL_NOT_NULL:
        match = _MYSQL_COLUMN.search(message)
        return _integrity("not_null", None, None, match.group("column") if match else None)
    if errno in _MYSQL_FOREIGN_KEY:
        return _integrity("foreign_key", None, None, None)
    if errno in _MYSQL_DATA_DESCRIPTIONS:
        match = _MYSQL_DATA_COLUMN.search(message)
        return _data_error(
            _MYSQL_DATA_DESCRIPTIONS[errno], match.group("column") if match else None
        )
    if errno in _MYSQL_TIMEOUT:
        return StatementTimeoutError("the statement ran past its deadline and was cancelled")
    if errno in _MYSQL_CONFLICT:
        return ConcurrentModificationError("a concurrent transaction conflicted; retry")
    if errno in _MYSQL_UNAVAILABLE:
        return DatabaseUnavailableError("the database connection failed")
    if errno in _MYSQL_ACCESS_DENIED:
        return AccessDeniedError("the database refused the statement")
    return None


def translate_error(exc: BaseException) -> DomainError | None:
    """The domain error ``exc`` stands for, or None when it is not a known database failure.

    ``asyncio.CancelledError`` is never translated: cancellation must propagate.
    """
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return None
    if isinstance(exc, sa_exc.TimeoutError):
        return DatabaseUnavailableError("no database connection became free in time")
    if isinstance(exc, sa_exc.DBAPIError):
        orig = exc.orig
        mapped: DomainError | None = None
        if isinstance(orig, sqlite3.Error):
            mapped = _from_sqlite(orig)
        elif isinstance(orig, asyncmy.errors.Error):
            mapped = _from_mysql(orig, exc.statement)
        elif orig is not None:
            mapped = _from_postgres(orig)
        if mapped is None and exc.connection_invalidated:
            mapped = DatabaseUnavailableError("the database connection was lost")
        return mapped
    if isinstance(exc, asyncpg.PostgresError):  # raised on the driver (db.point_reads)
        return _from_postgres(exc)
    if isinstance(exc, asyncmy.errors.Error):  # raised on the driver (db.repositories)
        return _from_mysql(exc)
    # sqlite3 binds parameters itself and raises these unwrapped (SQLAlchemy wraps only
    # DBAPI errors): a str with lone surrogates, an int beyond 64 bits.
    if isinstance(exc, UnicodeEncodeError):
        return _data_error("a text value is not valid UTF-8")
    if isinstance(exc, OverflowError):
        return _data_error("a number is out of the range the database holds")
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return DatabaseUnavailableError("the database connection was lost")
    if isinstance(exc, sa_exc.DisconnectionError | ConnectionError | OSError):
        return DatabaseUnavailableError("the database could not be reached")
    if isinstance(exc, TimeoutError):
        return DatabaseUnavailableError("the database did not answer in time")
    return None
