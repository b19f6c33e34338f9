"""Secrets never leave: no password, password hash, bearer token or session token in any
log line, exported span, error message, request-log row or stored row.

One end-to-end session against the real server, with the production logging
configuration at its most verbose (FERRULE_LOG_LEVEL=DEBUG, every logger), tracing
exported to an in-memory exporter and the request log on: users with passwords (created,
replayed by request_id, changed, verified right and wrong), sessions (opened, replayed
by request_id, read, listed, revoked), and failing calls (duplicate email, invalid
email, a forged token, a missing scope). Then every captured log record, every span
(name, attributes, events, status, links), every error a client received, every
request-log row and every row of every table is searched for each secret.

Precisely what is searched where:
- Passwords (the first and the changed one), the bearer tokens (the admin token, each
  JWT and its signature segment, and a forged JWT), the session token, and the argon2
  hashes (the hash of the first password, replaced by the change, and the current one,
  each whole and its digest segment), everywhere.
- The only place a secret may be is the current hash in `users.password_hash`: that
  column is excluded for the current hash alone (the test asserts it is there, which
  also proves the dump can see it). The first password's hash must be nowhere at all.
- A session token's SHA-256 is what `user_sessions.token_sha256` holds by design; the
  token itself must not be anywhere.
- Binary columns (the idempotency keys' stored responses are serialized protobuf) are
  searched as bytes, so a secret inside a stored message is found.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import inspect, select, table, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from ferrule.client import (
    AlreadyExists,
    FerruleError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from ferrule.v1 import prediction_service_pb2 as ppb
from ferrule.v1 import user_service_pb2 as pb
from server.logs import JsonFormatter, configure_logging
from server.telemetry import setup_telemetry
from tests.polling import eventually
from tests.server.conftest import ADMIN_TOKEN, RunningServer, StartServer, make_token

pytestmark = pytest.mark.timeout(180)

FIRST_PASSWORD = "canary-Pw-" + uuid.uuid4().hex
CHANGED_PASSWORD = "canary-Pw2-" + uuid.uuid4().hex


class CapturingHandler(logging.Handler):
    """Keeps every record and renders it three ways: the production JSON line, the
    plain text with any traceback, and the raw record's attributes."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self.rendered: list[str] = []
        self._json = JsonFormatter()
        self._plain = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.rendered.append(self._json.format(record))
        self.rendered.append(self._plain.format(record))
        self.rendered.append(repr(record.__dict__))


@pytest.fixture
def captured_logs() -> Iterator[CapturingHandler]:
    """The production logging configuration at DEBUG (configure_logging), plus a handler
    that keeps every record any logger emits through it."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    pinned = {name: logging.getLogger(name).level for name in logging.Logger.manager.loggerDict}
    configure_logging("DEBUG")
    handler = CapturingHandler()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in pinned.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class Secrets:
    """Every secret the session produced, and the errors the clients received."""

    passwords: list[str] = field(default_factory=lambda: [FIRST_PASSWORD, CHANGED_PASSWORD])
    bearer_tokens: list[str] = field(default_factory=list)
    session_tokens: list[str] = field(default_factory=list)
    replaced_hash: str = ""
    current_hash: str = ""
    errors: list[FerruleError] = field(default_factory=list)

    def needles(self, *, current_hash: bool = True) -> dict[str, str]:
        found: dict[str, str] = {}
        for i, password in enumerate(self.passwords):
            found[f"password {i}"] = password
        for i, token in enumerate(self.bearer_tokens):
            found[f"bearer token {i}"] = token
            if token.count(".") == 2:
                found[f"bearer token {i} signature"] = token.rsplit(".", 1)[1]
        for i, token in enumerate(self.session_tokens):
            found[f"session token {i}"] = token
        hashes = {"replaced hash": self.replaced_hash}
        if current_hash:
            hashes["current hash"] = self.current_hash
        for name, value in hashes.items():
            found[name] = value
            found[f"{name} digest"] = value.rsplit("$", 1)[1]
        return found


def _leaks(haystacks: Sequence[str | bytes], needles: dict[str, str]) -> list[str]:
    leaks = []
    for name, needle in needles.items():
        for haystack in haystacks:
            probe: Any = needle.encode() if isinstance(haystack, bytes) else needle
            if probe in haystack:
                shown = haystack[:300] if isinstance(haystack, str) else haystack[:300].hex()
                leaks.append(f"{name} in: {shown!r}")
                break
    return leaks


def _span_texts(spans: tuple[ReadableSpan, ...]) -> list[str]:
    texts = []
    for span in spans:
        texts.append(span.name)
        texts.append(repr(dict(span.attributes or {})))
        texts.append(repr(span.status.description))
        for event in span.events:
            texts.append(event.name + repr(dict(event.attributes or {})))
        for link in span.links:
            texts.append(repr(dict(link.attributes or {})))
        texts.append(repr(dict(span.resource.attributes)))
    return texts


async def _expect(secrets: Secrets, error_type: type[FerruleError], call: Any) -> FerruleError:
    with pytest.raises(error_type) as refused:
        await call
    secrets.errors.append(refused.value)
    return refused.value


async def _run_session(server: RunningServer, secrets: Secrets) -> None:
    admin = server.admin()
    secrets.bearer_tokens.append(ADMIN_TOKEN)
    org = await admin.users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name="Canary Inc"))
    )
    org_id = org.name.removeprefix("organizations/")
    writer_token = make_token(org_id, "read write", subject="svc-secrets")
    reader_token = make_token(org_id, "read", subject="svc-reader")
    secrets.bearer_tokens += [writer_token, reader_token]
    tenant = server.client(writer_token)
    reader = server.client(reader_token)

    # Users with passwords: created, replayed, refused, changed, verified.
    user_request = pb.CreateUserRequest(
        parent=org.name,
        user=pb.User(
            email="canary@example.com",
            role=pb.USER_ROLE_VIEWER,
            status=pb.USER_STATUS_ACTIVE,
            auth_provider=pb.AUTH_PROVIDER_EMAIL,
        ),
        password=FIRST_PASSWORD,
        request_id=str(uuid.uuid4()),
    )
    user = await tenant.users.CreateUser(user_request)
    assert await tenant.users.CreateUser(user_request) == user  # replayed
    secrets.replaced_hash = await _password_hash(server)
    duplicate = pb.CreateUserRequest()
    duplicate.CopyFrom(user_request)
    duplicate.request_id = str(uuid.uuid4())
    await _expect(secrets, AlreadyExists, tenant.users.CreateUser(duplicate))
    invalid = pb.CreateUserRequest()
    invalid.CopyFrom(duplicate)
    invalid.request_id = ""
    invalid.user.email = "not an email"
    await _expect(secrets, InvalidArgument, tenant.users.CreateUser(invalid))
    await _expect(
        secrets,
        PermissionDenied,
        reader.users.CreateUser(
            pb.CreateUserRequest(
                parent=org.name,
                user=pb.User(
                    email="reader-made@example.com",
                    role=pb.USER_ROLE_VIEWER,
                    status=pb.USER_STATUS_ACTIVE,
                    auth_provider=pb.AUTH_PROVIDER_EMAIL,
                ),
                password=FIRST_PASSWORD,
            )
        ),
    )
    await tenant.users.SetUserPassword(
        pb.SetUserPasswordRequest(name=user.name, password=CHANGED_PASSWORD)
    )
    secrets.current_hash = await _password_hash(server)
    assert secrets.current_hash != secrets.replaced_hash
    verify = tenant.users.VerifyPassword
    right = pb.VerifyPasswordRequest(
        parent=org.name, email="canary@example.com", password=CHANGED_PASSWORD
    )
    wrong = pb.VerifyPasswordRequest(
        parent=org.name, email="canary@example.com", password=FIRST_PASSWORD
    )
    assert (await verify(right)).valid
    assert not (await verify(wrong)).valid

    # Sessions: opened, replayed by request_id, read, listed, revoked.
    session_request = pb.CreateUserSessionRequest(
        parent=user.name,
        user_session=pb.UserSession(user_agent="canary-agent/1"),
        request_id=str(uuid.uuid4()),
    )
    opened = await tenant.users.CreateUserSession(session_request)
    assert opened.session_token
    secrets.session_tokens.append(opened.session_token)
    replayed = await tenant.users.CreateUserSession(session_request)
    assert replayed.name == opened.name and replayed.session_token == ""
    second = await tenant.users.CreateUserSession(pb.CreateUserSessionRequest(parent=user.name))
    secrets.session_tokens.append(second.session_token)
    await tenant.users.GetUserSession(pb.GetUserSessionRequest(name=opened.name))
    await tenant.users.ListUserSessions(pb.ListUserSessionsRequest(parent=user.name))
    await tenant.users.RevokeUserSession(pb.RevokeUserSessionRequest(name=opened.name))

    # A forged bearer token (right shape, wrong key) and a garbage one.
    forged = jwt.encode(
        {"sub": "mallory", "org": "*", "scope": "admin", "exp": int(time.time()) + 600},
        "not-the-server-secret-" + uuid.uuid4().hex,
        algorithm="HS256",
    )
    garbage = "garbage-token-" + uuid.uuid4().hex
    secrets.bearer_tokens += [forged, garbage]
    for bad in (forged, garbage):
        await _expect(
            secrets,
            Unauthenticated,
            server.client(bad).users.GetUser(pb.GetUserRequest(name=user.name)),
        )
    await admin.predictions.ListRequestLogs(
        ppb.ListRequestLogsRequest(parent="organizations/-", page_size=1000)
    )


async def _password_hash(server: RunningServer) -> str:
    engine = create_async_engine(server.database_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            value = (
                await conn.execute(
                    text("SELECT password_hash FROM users WHERE email = 'canary@example.com'")
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert isinstance(value, str) and value.startswith("$argon2id$")
    return value


@dataclass
class Cell:
    table: str
    column: str
    value: str | bytes


def _cells(rows: list[tuple[str, dict[str, Any]]]) -> list[Cell]:
    return [
        Cell(table, column, value if isinstance(value, bytes) else str(value))
        for table, row in rows
        for column, value in row.items()
        if value is not None
    ]


async def _dump(server: RunningServer) -> list[Cell]:
    """Every row of every table, column by column, on whichever backend the server uses."""
    rows: list[tuple[str, dict[str, Any]]] = []
    engine = create_async_engine(server.database_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
            for name in names:
                result = await conn.execute(select(text("*")).select_from(table(name)))
                rows += [(name, dict(row)) for row in result.mappings()]
    finally:
        await engine.dispose()
    return _cells(rows)


async def test_no_secret_in_logs_spans_errors_request_log_or_tables(
    start_server: StartServer,
    database_url: str,
    captured_logs: CapturingHandler,
) -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(spans)]
    )
    server = await start_server(database_url, telemetry=telemetry, ferrule_request_log=True)
    secrets = Secrets()
    await _run_session(server, secrets)

    # Every RPC's request-log row is written (in the background) before the search.
    server_spans = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(server_spans) >= 15

    async def request_log_complete() -> bool:
        cells = await _dump(server)
        ids = {c.value for c in cells if (c.table, c.column) == ("request_log", "id")}
        return len(ids) >= len(server_spans)

    await eventually(request_log_complete, what="every RPC in the request log")

    needles = secrets.needles()
    assert captured_logs.records, "the log capture saw nothing"
    log_leaks = _leaks(captured_logs.rendered, needles)
    span_leaks = _leaks(_span_texts(spans.get_finished_spans()), needles)
    error_texts = [
        f"{e!r} {e.message} {e.metadata} {e.details} {e.trailing_metadata}" for e in secrets.errors
    ]
    error_leaks = _leaks(error_texts, needles)
    cells = await _dump(server)
    request_log = [c.value for c in cells if c.table == "request_log"]
    assert request_log
    request_log_leaks = _leaks([str(v) for v in request_log], needles)
    # Everything except the current hash, searched everywhere; the current hash
    # everywhere except the one column that must hold it.
    everywhere = [c.value for c in cells]
    table_leaks = _leaks(everywhere, secrets.needles(current_hash=False))
    outside_hash_column = [
        c.value for c in cells if not (c.table == "users" and c.column == "password_hash")
    ]
    table_leaks += _leaks(
        outside_hash_column,
        {
            "current hash": secrets.current_hash,
            "current hash digest": secrets.current_hash.rsplit("$", 1)[1],
        },
    )
    assert secrets.current_hash in [
        c.value for c in cells if c.table == "users" and c.column == "password_hash"
    ], "the dump cannot see the one place the hash belongs"

    assert log_leaks == []
    assert span_leaks == []
    assert error_leaks == []
    assert request_log_leaks == []
    assert table_leaks == []
    # The session really went through the failing paths searched above.
    assert {type(e) for e in secrets.errors} == {
        AlreadyExists,
        InvalidArgument,
        PermissionDenied,
        Unauthenticated,
    }
