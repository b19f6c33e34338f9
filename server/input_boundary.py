"""The one input boundary: every value a request carries is checked here before any servicer,
SQL statement, log line or stored JSON document sees it.

The walk is driven by the request's descriptor, so a field added to the contract is checked
by construction:

* text (every string field, map key, FieldMask path and Struct string or key): no NUL
  (PostgreSQL text cannot hold U+0000), valid UTF-8 without lone surrogates, and at most the
  length of the column it is stored in or compared with. The length comes from the
  SQLAlchemy model (:data:`_MESSAGE_MODELS` pairs a message with the model whose
  same-named columns it fills, :data:`_FIELD_COLUMNS` names the rest); a field that
  reaches no bounded column is held to :data:`UNMAPPED_MAX_CHARS`.
* numbers: doubles must be finite (JSON, and so jsonb, cannot hold NaN or Infinity).
* structured values (Struct, Value, ListValue, and JSON text decoded by a servicer): at most
  :data:`MAX_NESTING` levels deep, finite numbers, text as above.
* Timestamp and Duration: within the ranges the protobuf well-known types define.

Violations become INVALID_ARGUMENT with a BadRequest field violation naming the field path
(``requests[2].prediction.features.a.b``). Whatever still reaches the database is caught by
the backstop in :mod:`db.error_translation` (data-class errors -> INVALID_ARGUMENT).
"""

from __future__ import annotations

import functools
import math
import uuid
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from sqlalchemy import String
from sqlalchemy.orm import InstrumentedAttribute

from db.errors import FieldViolation, ValidationError
from db.models import (
    AnalysisBatch,
    Base,
    IdempotencyKey,
    IngestBatch,
    ModelPerformanceRecord,
    Organization,
    Prediction,
    RequestLogEntry,
    TextAnalysis,
    User,
    UserProfile,
    UserSession,
)

#: Deepest nesting of a structured value (Struct in Struct, list in list, ...). MariaDB's
#: JSON columns refuse documents deeper than 32 levels, the innermost value counting as one.
MAX_NESTING = 31
#: Strings that reach no bounded column (resource names, page tokens, order_by, passwords)
#: still reach logs and parsers: bound them too.
UNMAPPED_MAX_CHARS = 4096

#: google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
#: google.protobuf.Duration: +-10,000 years.
DURATION_MAX_SECONDS = 315_576_000_000
_NANOS = 1_000_000_000

NUL = "must not contain the NUL character (U+0000)"
SURROGATE = "must be valid UTF-8 (no unpaired surrogate code points)"
NOT_FINITE = "must be a finite number (NaN and Infinity are not JSON)"
TOO_DEEP = f"is nested deeper than {MAX_NESTING} levels"

#: Messages whose fields are stored in, or compared with, the same-named columns of a model.
_MESSAGE_MODELS: dict[str, type[Base]] = {
    "ferrule.v1.Organization": Organization,
    "ferrule.v1.User": User,
    "ferrule.v1.UserProfile": UserProfile,
    "ferrule.v1.UserSession": UserSession,
    "ferrule.v1.LookupUserByEmailRequest": User,
    "ferrule.v1.VerifyPasswordRequest": User,
    "ferrule.v1.AnalysisBatch": AnalysisBatch,
    "ferrule.v1.Analysis": TextAnalysis,
    "ferrule.v1.ListAnalysesRequest": TextAnalysis,
    "ferrule.v1.SearchAnalysesRequest": TextAnalysis,
    "ferrule.v1.GetAnalysisStatisticsRequest": TextAnalysis,
    "ferrule.v1.ModelPerformance": ModelPerformanceRecord,
    "ferrule.v1.ListModelPerformancesRequest": ModelPerformanceRecord,
    "ferrule.v1.Prediction": Prediction,
    "ferrule.v1.PredictionFilter": Prediction,
    "ferrule.v1.ListRequestLogsRequest": RequestLogEntry,
}

#: Fields whose column has another name, or lives in another model.
_FIELD_COLUMNS: dict[tuple[str, str], InstrumentedAttribute[Any]] = {
    ("ferrule.v1.UserSession", "ip_address"): UserSession.peer,
    ("ferrule.v1.SearchUsersRequest", "query"): User.email,  # matched against email/username
    # Searched for in the texts; the servicer holds it to the longest text.
    ("ferrule.v1.SearchAnalysesRequest", "query"): TextAnalysis.text,
    ("ferrule.v1.StreamPredictionsRequest", "batch_id"): IngestBatch.batch_id,
}
#: A `request_id` of any message is the idempotency key's.
_FIELD_NAME_COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "request_id": IdempotencyKey.request_id,
}
#: Text fields bounded by their own rule instead of a column (the features snapshot as JSON
#: text is held to a byte budget and decoded by the row rules, which apply this module's
#: JSON checks to the result).
_OWN_BOUND: frozenset[tuple[str, str]] = frozenset({("ferrule.v1.Prediction", "features_json")})

#: Fields the prediction row rules (server/services/prediction_rows.py) check with this
#: module's rules and constants, so the walk leaves them alone: StreamPredictions rejects
#: a bad row in its ack instead of failing the stream, and every write path already walks
#: each row's features once to convert them (walking them here too would double the
#: cost of BatchCreatePredictions' thousand rows).
ROWS_CHECKED_BY_SERVICE: frozenset[tuple[str, str]] = frozenset(
    {
        ("ferrule.v1.StreamPredictionsRequest", "predictions"),
        ("ferrule.v1.Prediction", "features"),
    }
)


def column_limit(column: InstrumentedAttribute[Any]) -> int | None:
    """The character length of a String column (None for unbounded text)."""
    kind = column.property.columns[0].type
    return kind.length if isinstance(kind, String) else None


@functools.cache
def text_limit(message_name: str, field_name: str) -> int | None:
    """How many characters the field may hold: its column's length, None for an unbounded
    column or a field with its own bound, else UNMAPPED_MAX_CHARS."""
    if (message_name, field_name) in _OWN_BOUND:
        return None
    column = _FIELD_COLUMNS.get((message_name, field_name)) or _FIELD_NAME_COLUMNS.get(field_name)
    if column is None:
        model = _MESSAGE_MODELS.get(message_name)
        mapped = getattr(model, field_name, None) if model is not None else None
        if isinstance(mapped, InstrumentedAttribute) and hasattr(mapped.property, "columns"):
            column = mapped
    if column is None:
        return UNMAPPED_MAX_CHARS
    return column_limit(column)


def text_problem(value: str, limit: int | None = UNMAPPED_MAX_CHARS) -> str | None:
    """Why ``value`` may not be stored or logged, or None when it may."""
    if "\x00" in value:
        return NUL
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return SURROGATE
    if limit is not None and len(value) > limit:
        return f"at most {limit} characters"
    return None


def loggable(value: str) -> str:
    """``value`` with what a log line or text column cannot hold replaced (for values that
    are recorded, not refused: peer, user agent)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def json_problem(value: Any, path: str) -> FieldViolation | None:
    """The first problem of a decoded JSON value (nesting, non-finite numbers, text)."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item, None)
            if problem:
                return FieldViolation(where, problem)
        elif isinstance(item, float):
            if not math.isfinite(item):
                return FieldViolation(where, NOT_FINITE)
        elif isinstance(item, dict | list):
            if depth >= MAX_NESTING:
                return FieldViolation(where, TOO_DEEP)
            if isinstance(item, dict):
                for key, child in item.items():
                    problem = text_problem(key, None) if isinstance(key, str) else None
                    if problem:
                        return FieldViolation(f"{where}.{key!r}", f"keys {problem}")
                    stack.append((child, f"{where}.{key}", depth + 1))
            else:
                stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
    return None


# --- the walk over a request message ---------------------------------------------------


def violations_of(message: Message) -> list[FieldViolation]:
    """Every boundary violation of a request message, with its field path."""
    found: list[FieldViolation] = []
    _walk(message, "", found)
    return found


def check(message: Message) -> None:
    """Raise ValidationError (INVALID_ARGUMENT) when ``message`` breaks the boundary."""
    found = violations_of(message)
    if found:
        raise ValidationError(found)


def _timestamp(message: Any, path: str, found: list[FieldViolation]) -> None:
    if not (
        TIMESTAMP_MIN_SECONDS <= message.seconds <= TIMESTAMP_MAX_SECONDS
        and 0 <= message.nanos < _NANOS
    ):
        found.append(FieldViolation(path, "not a valid timestamp (years 1 to 9999)"))


def _duration(message: Any, path: str, found: list[FieldViolation]) -> None:
    seconds, nanos = message.seconds, message.nanos
    if not (
        -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS
        and -_NANOS < nanos < _NANOS
        and (seconds == 0 or nanos == 0 or (seconds < 0) == (nanos < 0))
    ):
        found.append(FieldViolation(path, "duration out of range (at most 10,000 years)"))


def _field_mask(message: Any, path: str, found: list[FieldViolation]) -> None:
    for i, item in enumerate(message.paths):
        problem = text_problem(item)
        if problem:
            found.append(FieldViolation(f"{path}.paths[{i}]", problem))


def _struct(message: Any, path: str, found: list[FieldViolation], depth: int = 1) -> None:
    if depth > MAX_NESTING:
        found.append(FieldViolation(path, TOO_DEEP))
        return
    for key, item in message.fields.items():
        if "\x00" in key or not key.isascii():
            problem = text_problem(key, None)
            if problem:
                found.append(FieldViolation(f"{path}.{key!r}", f"keys {problem}"))
        _value(item, path, key, found, depth)


def _list(message: Any, path: str, found: list[FieldViolation], depth: int = 1) -> None:
    if depth > MAX_NESTING:
        found.append(FieldViolation(path, TOO_DEEP))
        return
    for i, item in enumerate(message.values):
        _value(item, path, i, found, depth)


def _value(
    message: Any, path: str, key: str | int, found: list[FieldViolation], depth: int = 0
) -> None:
    """One Value under ``path`` at ``key`` (the path is only built when it is needed)."""
    kind = message.WhichOneof("kind")
    if kind == "string_value":
        text = message.string_value
        if "\x00" in text or not text.isascii():
            problem = text_problem(text, None)
            if problem:
                found.append(FieldViolation(_item_path(path, key), problem))
    elif kind == "number_value":
        if not math.isfinite(message.number_value):
            found.append(FieldViolation(_item_path(path, key), NOT_FINITE))
    elif kind == "struct_value":
        _struct(message.struct_value, _item_path(path, key), found, depth + 1)
    elif kind == "list_value":
        _list(message.list_value, _item_path(path, key), found, depth + 1)


def _item_path(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def _top_value(message: Any, path: str, found: list[FieldViolation]) -> None:
    _value(message, path.rpartition(".")[0], path.rpartition(".")[2], found)


_WELL_KNOWN = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _duration,
    "google.protobuf.FieldMask": _field_mask,
    "google.protobuf.Struct": _struct,
    "google.protobuf.ListValue": _list,
    "google.protobuf.Value": _top_value,
}

# What the walk does with a set field, decided once per message type.
_SKIP, _TEXT, _DOUBLE, _MESSAGE, _MAP = range(5)
_DOUBLES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


def _rule(message_name: str, fd: FieldDescriptor) -> tuple[int, bool, int | None]:
    """(what to do, repeated, text limit) for one field."""
    if (message_name, fd.name) in ROWS_CHECKED_BY_SERVICE:
        return _SKIP, False, None
    entry = fd.message_type
    if entry is not None:
        return (_MAP if entry.GetOptions().map_entry else _MESSAGE), fd.is_repeated, None
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _TEXT, fd.is_repeated, text_limit(message_name, fd.name)
    if fd.type in _DOUBLES:
        return _DOUBLE, fd.is_repeated, None
    return _SKIP, False, None


_PLANS: dict[str, dict[str, tuple[int, bool, int | None]]] = {}


def _plan(descriptor: Any) -> dict[str, tuple[int, bool, int | None]]:
    name: str = descriptor.full_name
    plan = _PLANS.get(name)
    if plan is None:
        plan = _PLANS[name] = {fd.name: _rule(name, fd) for fd in descriptor.fields}
    return plan


def _text(value: str, limit: int | None, path: str, found: list[FieldViolation]) -> None:
    if "\x00" in value or not value.isascii() or (limit is not None and len(value) > limit):
        problem = text_problem(value, limit)
        if problem:
            found.append(FieldViolation(path, problem))


def _walk(message: Message, path: str, found: list[FieldViolation]) -> None:
    descriptor = message.DESCRIPTOR
    special = _WELL_KNOWN.get(descriptor.full_name)
    if special is not None:
        special(message, path.removesuffix("."), found)
        return
    plan = _plan(descriptor)
    for fd, value in message.ListFields():
        action, repeated, limit = plan[fd.name]
        if action == _SKIP:
            continue
        if action == _TEXT:
            if repeated:
                for i, item in enumerate(value):
                    _text(item, limit, f"{path}{fd.name}[{i}]", found)
            else:
                _text(value, limit, path + fd.name, found)
        elif action == _MESSAGE:
            if repeated:
                for i, item in enumerate(value):
                    _walk(item, f"{path}{fd.name}[{i}].", found)
            else:
                _walk(value, f"{path}{fd.name}.", found)
        elif action == _DOUBLE:
            finite = all(map(math.isfinite, value)) if repeated else math.isfinite(value)
            if not finite:
                found.append(FieldViolation(path + fd.name, NOT_FINITE))
        else:
            _map(fd, value, path + fd.name, found)


def _map(fd: FieldDescriptor, value: Any, where: str, found: list[FieldViolation]) -> None:
    entry = fd.message_type
    assert entry is not None
    plan = _plan(entry)
    _, _, key_limit = plan["key"]
    value_action, _, value_limit = plan["value"]
    for key, item in value.items():
        item_path = f"{where}[{key!r}]"
        if isinstance(key, str):
            _text(key, key_limit, item_path, found)
        if value_action == _MESSAGE:
            _walk(item, item_path + ".", found)
        elif value_action == _TEXT:
            _text(item, value_limit, item_path, found)
        elif value_action == _DOUBLE and not math.isfinite(item):
            found.append(FieldViolation(item_path, NOT_FINITE))


# --- the caller's identity --------------------------------------------------------------

#: The JWT subject is recorded in every audit column (create_by, ...).
SUBJECT_MAX_CHARS = column_limit(Organization.create_by)


def subject_problem(subject: str) -> str | None:
    """Why a JWT `sub` cannot be recorded as the caller, or None."""
    return text_problem(subject, SUBJECT_MAX_CHARS)


def is_organization_claim(value: str, all_organizations: str) -> bool:
    """A JWT `org` is one organization's UUID or the all-organizations marker."""
    if value == all_organizations:
        return True
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
