"""Bad input, as a property: whatever arrives, every RPC answers with a deliberate status,
on PostgreSQL and on the embedded SQLite default.

The RPCs are found by walking the services' descriptors (so a new RPC is covered without
editing this file, and a new service fails `test_every_rpc_of_every_service_is_walked`);
each request is built by hypothesis from strategies per field type, in every field,
nested message and filter, mixed with values chosen to hurt: real names of this and
another tenant, malformed names, SQL-injection strings, NUL and mixed-NUL strings, text
of exactly the field's column length and one more (the length the input boundary derives
from the model), emoji, combining marks and bidi controls, JSON text with lone surrogate
escapes or nested hundreds deep, Structs nested to protobuf's limit with NaN and Infinity
inside, extreme integers, non-finite doubles, forged page tokens, field masks of unknown
paths, out-of-range timestamps and durations. Every call goes out under one of several
credentials (admin, each tenant, read-only, forged, expired, none).

The property: the status is never INTERNAL, UNKNOWN or DATA_LOSS, the server still answers
health afterwards, and a call that was refused left every table as it was (checksum of
each table's rows before and after). It runs in bounded time: EXAMPLES_PER_RPC examples
per RPC and backend, each call under a deadline. Separate tests pin SQL injection (stored
and matched literally), forged and cross-tenant page tokens (INVALID_ARGUMENT), malformed
bytes and the message size limit (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import importlib
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import jwt
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrule.client import AsyncFerruleClient, FerruleError, InvalidArgument
from ferrule.v1 import (
    analysis_service_pb2,
    common_pb2,
    health_service_pb2,
    prediction_service_pb2,
    user_service_pb2,
)
from server import input_boundary
from server.app import FerruleApp
from tests.server.conftest import (
    ADMIN_TOKEN,
    JWT_SECRET,
    RunningServer,
    make_token,
    server_settings,
)
from tests.template_databases import clone_sqlite_database

pytestmark = pytest.mark.timeout(300)
_T = TypeVar("_T")

MAX_MESSAGE_BYTES = 64 * 1024
#: Per RPC and backend: the whole property costs well under a minute per backend.
EXAMPLES_PER_RPC = 8

SERVICES = {
    "users": user_service_pb2.DESCRIPTOR.services_by_name["UserService"],
    "analyses": analysis_service_pb2.DESCRIPTOR.services_by_name["AnalysisService"],
    "predictions": prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
    "health": health_service_pb2.DESCRIPTOR.services_by_name["HealthService"],
}
METHODS: list[tuple[str, MethodDescriptor]] = [
    (attribute, method) for attribute, service in SERVICES.items() for method in service.methods
]

SQL_INJECTION = [
    "'); DROP TABLE users; --",
    "%' OR '1'='1",
    "' OR 1=1 --",
    '"; SELECT pg_sleep(10); --',
    "1; DELETE FROM organizations",
    "%",
    "_",
    "\\",
    "$1",
    ":name",
]
#: Tables whose rows a refused call must leave untouched (request_log is written for
#: every call, refused or not, by design).
CHECKED_TABLES = (
    "organizations",
    "users",
    "user_profiles",
    "user_sessions",
    "analysis_batches",
    "text_analyses",
    "model_performance_records",
    "predictions",
    "ingest_batches",
    "idempotency_keys",
)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


# --- the world: two tenants with one of everything -------------------------------------


@dataclass
class Tenant:
    id: str
    parent: str
    client: AsyncFerruleClient
    #: Every resource name created for this tenant.
    names: list[str] = field(default_factory=list)
    #: Unique strings stored in its rows (display names, emails, texts, subjects).
    values: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)


Checksum = Callable[[], Coroutine[Any, Any, dict[str, str]]]


@dataclass
class World:
    server: RunningServer
    a: Tenant
    b: Tenant
    clients: dict[str, AsyncFerruleClient]
    #: count + digest of every row, per checked table.
    checksum: Checksum


async def seed_tenant(server: RunningServer, label: str) -> Tenant:
    """An organization with a user (and session), a batch, analyses and predictions,
    every value tagged with a unique marker so a leak is recognisable."""
    marker = f"{label}{uuid.uuid4().hex[:10]}"
    org = await server.admin().users.CreateOrganization(
        user_service_pb2.CreateOrganizationRequest(
            organization=user_service_pb2.Organization(display_name=f"org-{marker}")
        )
    )
    org_id = org.name.removeprefix("organizations/")
    client = server.for_org(org_id, scope="read write admin")
    tenant = Tenant(org_id, org.name, client, names=[org.name], values=[f"org-{marker}"])
    for i in range(3):
        user = await client.users.CreateUser(
            user_service_pb2.CreateUserRequest(
                parent=org.name,
                user=user_service_pb2.User(
                    email=f"u{i}-{marker}@example.com",
                    username=f"user{i}{marker}",
                    full_name=f"Full {marker} {i}",
                    role=user_service_pb2.USER_ROLE_MEMBER,
                    status=user_service_pb2.USER_STATUS_ACTIVE,
                    auth_provider=user_service_pb2.AUTH_PROVIDER_EMAIL,
                    profile=user_service_pb2.UserProfile(bio=f"bio {marker}"),
                ),
                password=f"pw-{marker}-secret",
            )
        )
        tenant.names.append(user.name)
        tenant.values += [user.email, user.username]
    session = await client.users.CreateUserSession(
        user_service_pb2.CreateUserSessionRequest(
            parent=tenant.names[1],
            user_session=user_service_pb2.UserSession(user_agent=f"agent-{marker}"),
        )
    )
    tenant.names.append(session.name)
    tenant.values.append(session.session_token)
    batch = await client.analyses.CreateBatch(
        analysis_service_pb2.CreateBatchRequest(
            parent=org.name, batch=analysis_service_pb2.AnalysisBatch(display_name=f"b-{marker}")
        )
    )
    tenant.names.append(batch.name)
    for i in range(3):
        analysis = await client.analyses.CreateAnalysis(
            analysis_service_pb2.CreateAnalysisRequest(
                parent=org.name,
                analysis=analysis_service_pb2.Analysis(
                    text=f"text {marker} {i}",
                    analysis_type=analysis_service_pb2.ANALYSIS_TYPE_SENTIMENT,
                    batch=batch.name,
                ),
            )
        )
        tenant.names.append(analysis.name)
        tenant.values.append(f"text {marker} {i}")
    await client.analyses.CreateModelPerformance(
        analysis_service_pb2.CreateModelPerformanceRequest(
            parent=org.name,
            model_performance=analysis_service_pb2.ModelPerformance(
                model_name=f"model-{marker}",
                model_version="v1",
                window_start_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
                window_end_time=timestamp_pb2.Timestamp(seconds=1_700_003_600),
            ),
        )
    )
    tenant.values.append(f"model-{marker}")
    for i in range(3):
        prediction = await client.predictions.CreatePrediction(
            prediction_service_pb2.CreatePredictionRequest(
                parent=org.name,
                prediction=prediction_service_pb2.Prediction(
                    subject_id=f"subject-{marker}-{i}",
                    probability=0.2 * (i + 1),
                    model_name=f"pmodel-{marker}",
                    model_version=f"v-{marker}",
                ),
            )
        )
        tenant.names.append(prediction.name)
        tenant.values.append(f"subject-{marker}-{i}")
    # Real page tokens of this tenant (page_size=1 leaves a next page).
    users = await client.users.ListUsers(
        user_service_pb2.ListUsersRequest(parent=org.name, page_size=1)
    )
    analyses = await client.analyses.ListAnalyses(
        analysis_service_pb2.ListAnalysesRequest(parent=org.name, page_size=1)
    )
    predictions = await client.predictions.ListPredictions(
        prediction_service_pb2.ListPredictionsRequest(parent=org.name, page_size=1)
    )
    tenant.page_tokens += [
        users.next_page_token,
        analyses.next_page_token,
        predictions.next_page_token,
    ]
    assert all(tenant.page_tokens)
    return tenant


def _forged_token(**claims: Any) -> str:
    body = {"sub": "forger", "org": "*", "scope": "read write admin", "exp": time.time() + 600}
    body.update(claims)
    return jwt.encode(body, "not-the-secret-" + "z" * 32, algorithm="HS256")


async def start_world(url: str, checksum: Checksum) -> AsyncIterator[World]:
    """One server (small message limit) on the database at ``url`` (at head), seeded with
    two tenants."""
    app = FerruleApp(server_settings(url, ferrule_max_message_bytes=MAX_MESSAGE_BYTES))
    port = await app.start()
    server = RunningServer(app=app, database_url=url, target=f"127.0.0.1:{port}")
    try:
        a = await seed_tenant(server, "alpha")
        b = await seed_tenant(server, "bravo")
        expired = jwt.encode(
            {"sub": "late", "org": a.id, "scope": "read write", "exp": int(time.time()) - 60},
            JWT_SECRET,
            algorithm="HS256",
        )
        clients = {
            "admin": server.client(ADMIN_TOKEN, max_attempts=1),
            "a": server.client(make_token(a.id, "read write"), max_attempts=1),
            "a-read": server.client(make_token(a.id, "read"), max_attempts=1),
            "a-admin": server.client(make_token(a.id, "read write admin"), max_attempts=1),
            "b": server.client(make_token(b.id, "read write"), max_attempts=1),
            "forged": server.client(_forged_token(), max_attempts=1),
            "expired": server.client(expired, max_attempts=1),
            "garbage": server.client("not.a.jwt", max_attempts=1),
            "none": server.client(None, max_attempts=1),
        }
        yield World(server, a, b, clients, checksum)
    finally:
        for client in server.clients:
            await client.close()
        await app.stop(grace=0.5)


async def checksum(conn: asyncpg.Connection) -> dict[str, str]:
    """count + md5 of every row, per table, in one statement."""
    parts = [
        f"SELECT '{t}' AS t, count(*)::text || ':' || "
        f"md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) AS c FROM {t} x"
        for t in CHECKED_TABLES
    ]
    return {r["t"]: r["c"] for r in await conn.fetch(" UNION ALL ".join(parts))}


def _sqlite_checksum(path: Path) -> dict[str, str]:
    """The same digest for SQLite: count + sha256 of every row's repr, in row order."""
    with sqlite3.connect(path) as conn:
        result = {}
        for table in CHECKED_TABLES:
            rows = sorted(repr(row) for row in conn.execute(f"SELECT * FROM {table}"))
            digest = hashlib.sha256("|".join(rows).encode("utf-8", "surrogatepass"))
            result[table] = f"{len(rows)}:{digest.hexdigest()}"
    return result


async def pg_world(url: str) -> AsyncIterator[World]:
    """The world on the PostgreSQL database at ``url`` (fresh, at head)."""
    conn: asyncpg.Connection | None = None

    async def pg_checksum() -> dict[str, str]:
        nonlocal conn
        if conn is None:
            conn = await asyncpg.connect(_dsn(url))
        return await checksum(conn)

    try:
        async for value in start_world(url, pg_checksum):
            yield value
    finally:
        if conn is not None:
            await conn.close()


@pytest.fixture(scope="module")
async def world(pg_module_database_url: str) -> AsyncIterator[World]:
    async for value in pg_world(pg_module_database_url):
        yield value


@pytest.fixture(scope="module")
async def sqlite_world(
    sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    """The world on the embedded default: a fresh SQLite file at head."""
    path = tmp_path_factory.mktemp("bad-input") / "ferrule.db"
    url = clone_sqlite_database(sqlite_template, path)

    async def sqlite_checksum() -> dict[str, str]:
        return await asyncio.to_thread(_sqlite_checksum, path)

    async for value in start_world(url, sqlite_checksum):
        yield value


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def any_world(request: pytest.FixtureRequest) -> World:
    """Each backend's world (sync, so it may ask for the async fixtures by name)."""
    value: World = request.getfixturevalue(
        "world" if request.param == "postgresql" else "sqlite_world"
    )
    return value


# --- strategies from descriptors --------------------------------------------------------


def _tampered(token: str) -> str:
    """``token`` with one character in the middle changed (still plausible base64)."""
    middle = len(token) // 2
    swapped = "A" if token[middle] != "A" else "B"
    return token[:middle] + swapped + token[middle + 1 :]


def interesting_strings(world: World) -> st.SearchStrategy[str]:
    """Strings worth sending in any string field."""
    names = world.a.names + world.b.names
    pool = [
        *names,
        *(n + "/extra" for n in names),
        *(n.replace(world.a.id, world.b.id) for n in world.a.names),
        *world.a.page_tokens,
        *world.b.page_tokens,
        *(_tampered(t) for t in world.a.page_tokens),
        *world.a.values[:4],
        *SQL_INJECTION,
        "",
        " ",
        "\x00",
        "a\x00b",
        "organizations/",
        "organizations/-",
        "organizations/*",
        "organizations/not-a-uuid",
        f"organizations/{uuid.UUID(int=0)}",
        f"organizations/{world.a.id}/users/",
        f"organizations/{world.a.id}/../{world.b.id}",
        "create_time desc",
        "name asc, create_time",
        "probability desc; drop",
        "x" * 5000,
        "ünïcödé ✓ 🚀",
        *HOSTILE_TEXT,
        str(uuid.uuid4()),
        "user@example.com",
        "AAAA",
    ]
    return st.one_of(st.sampled_from(pool), st.text(max_size=40), _with_nul)


#: Text that is valid UTF-8 but hostile to displays, logs and JSON columns.
HOSTILE_TEXT = [
    "\u202eevil\u202c",  # right-to-left override
    "\u2066isolate\u2069\u200f",  # bidi isolates, right-to-left mark
    "e\u0301\u0301\u0301",  # stacked combining marks
    "👩\u200d👩\u200d👧\u200d👦🏳️\u200d🌈",  # ZWJ sequences
    "🚀" * 300,
    "\ufeff\ufffe\uffff",  # BOM and non-characters
    "\U0010ffff",
    '{"a": "\\ud800"}',  # JSON text with a lone surrogate escape
    '{"a": "\\u0000"}',  # JSON text with U+0000
    '{"a": ' * 300 + "1" + "}" * 300,  # JSON nested far deeper than protobuf allows
    '{"a": ' + "[" * 40 + "1" + "]" * 40 + "}",  # deeper than the boundary allows
    '{"a": NaN, "b": Infinity}',
    '{"a": 1e999}',
]

#: NUL anywhere in otherwise ordinary text.
_with_nul = st.builds(
    lambda head, tail: f"{head}\x00{tail}", st.text(max_size=8), st.text(max_size=8)
)


@functools.cache
def _lengths(limit: int) -> st.SearchStrategy[str]:
    """Text of exactly ``limit`` characters and one more, plain and multi-byte."""
    return st.sampled_from(
        [
            "x" * limit,
            "x" * (limit + 1),
            ("é🚀\u202e" * limit)[:limit],
            ("é🚀\u202e" * limit)[: limit + 1],
            "\x00" + "x" * (limit - 1),
        ]
    )


#: Plausible values per field name (real names of the tenant), so that most examples get
#: past name parsing and authorization to where a hostile value reaches SQL.
Named = Mapping[str, st.SearchStrategy[str]]


def _field_strings(
    fd: FieldDescriptor, strings: st.SearchStrategy[str], named: Named
) -> st.SearchStrategy[str]:
    """The shared hostile strings, NUL mixtures, lengths at and past this field's column's
    limit, and (for names) mostly plausible values."""
    assert fd.containing_type is not None
    limit = input_boundary.text_limit(fd.containing_type.full_name, fd.name)
    hostile = st.one_of(strings, _with_nul, _lengths(limit or input_boundary.UNMAPPED_MAX_CHARS))
    plausible = named.get(fd.name)
    return hostile if plausible is None else st.one_of(plausible, plausible, hostile)


def plausible_names(world: World) -> Named:
    """Tenant a's real names for the fields that hold names."""
    a = world.a
    resources = st.sampled_from(a.names)
    return {
        "parent": st.one_of(st.just(a.parent), resources),
        "name": resources,
        "batch": resources,
    }


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -(2.0**63), 2.0**64])
    | st.text(max_size=10)
    | _with_nul
    | st.sampled_from(HOSTILE_TEXT[:4]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _timestamps() -> st.SearchStrategy[Message]:
    return st.builds(
        lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
        st.one_of(
            st.integers(-62135596800, 253402300799),  # the valid range
            st.sampled_from([0, -(2**40), 2**40]),  # outside it
        ),
        st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 2_000_000_000])),
    )


def _scalar(
    fd: FieldDescriptor, strings: st.SearchStrategy[str], named: Named | None = None
) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return _field_strings(fd, strings, named or {})
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=24)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        special = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1.0, 0.5, 1e300, -1.0])
        return st.one_of(special, st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64))
    if t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 99))
    low, high = _INT_RANGES[t]
    edges = [low, high, 0, -1, 1, 1000, 1001] if low < 0 else [low, high, 0, 1, 1000, 1001]
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]),
                     st.integers(low, high))  # fmt: skip


def message_strategy(
    descriptor: Descriptor,
    strings: st.SearchStrategy[str],
    field_names: list[str],
    depth: int = 0,
    named: Named | None = None,
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to hostile values."""
    cls = GetMessageClass(descriptor)
    full = descriptor.full_name
    if full == "google.protobuf.Timestamp":
        return _timestamps()
    if full == "google.protobuf.Duration":
        return st.builds(
            lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
            st.integers(-(10**12), 10**12),
            st.integers(-999_999_999, 999_999_999),
        )
    if full == "google.protobuf.FieldMask":
        paths = st.one_of(st.sampled_from([*field_names, "*", "", "name", "etag"]), strings)
        return st.builds(lambda p: field_mask_pb2.FieldMask(paths=p), st.lists(paths, max_size=4))
    if full == "google.protobuf.Struct":
        keys = st.one_of(st.text(max_size=10), _with_nul)
        return st.one_of(
            st.builds(_struct, st.dictionaries(keys, _json, max_size=4)),
            # Up to the deepest a Struct can be inside a request (protobuf's decode limit).
            st.builds(_nested_struct, st.integers(20, 32), st.sampled_from(_STRUCT_LEAVES)),
        )
    if full in ("google.protobuf.Value", "google.protobuf.ListValue", "google.protobuf.Any"):
        return st.just(cls())
    if depth > 3:
        return st.just(cls())
    optional = {
        fd.name: _field_strategy(fd, strings, field_names, depth, named or {})
        for fd in descriptor.fields
    }
    dense = st.fixed_dictionaries({}, optional=optional)
    if not named:
        return st.builds(lambda values: _build(cls, values), dense)
    # Mostly sparse: real names where the message holds names, and one or two other fields
    # set (a hostile value then reaches the database instead of hiding behind a refusal
    # of some other field); densely hostile messages now and then.
    always = {name: value for name, value in optional.items() if name in named}
    others = sorted(name for name in optional if name not in named)
    if not others:
        return st.builds(lambda values: _build(cls, values), st.one_of(dense, st.just({})))

    def pick(chosen: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({**always, **{name: optional[name] for name in chosen}})

    sparse = st.lists(st.sampled_from(others), min_size=1, max_size=2, unique=True).flatmap(pick)
    return st.builds(lambda values: _build(cls, values), st.one_of(sparse, sparse, dense))


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


_STRUCT_LEAVES: list[Any] = [math.nan, math.inf, 1.0, "ok", "a\x00b", None]


def _nested_struct(levels: int, leaf: Any) -> struct_pb2.Struct:
    """{"k": {"k": ... {"leaf": leaf}}}, ``levels`` Structs deep."""
    top = struct_pb2.Struct()
    current = top
    for _ in range(levels - 1):
        current = current.fields["k"].struct_value
    current.update({"leaf": leaf})
    return top


def _field_strategy(
    fd: FieldDescriptor,
    strings: st.SearchStrategy[str],
    field_names: list[str],
    depth: int,
    named: Named,
) -> st.SearchStrategy[Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key_fd, value_fd = (
            fd.message_type.fields_by_name["key"],
            fd.message_type.fields_by_name["value"],
        )
        return st.dictionaries(
            _scalar(key_fd, strings, named),
            _field_strategy(value_fd, strings, field_names, depth + 1, named),
            max_size=3,
        )
    if fd.message_type is not None:
        one = message_strategy(fd.message_type, strings, field_names, depth + 1, named)
    else:
        one = _scalar(fd, strings, named)
    if fd.is_repeated:
        return st.lists(one, max_size=3)
    return one


def _build(cls: Callable[[], Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        fd = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif fd.is_repeated:
            target.extend(value)
        elif isinstance(value, Message):
            try:
                target.CopyFrom(value)
            except DecodeError:  # nested past protobuf's limit here: not sendable at all
                continue
        else:
            setattr(message, name, value)
    return message


def _all_field_names() -> list[str]:
    names: set[str] = set()
    for service in SERVICES.values():
        for method in service.methods:
            for message in (method.input_type, method.output_type):
                names.update(fd.name for fd in message.fields)
                for fd in message.fields:
                    if fd.message_type is not None:
                        names.update(f"{fd.name}.{sub.name}" for sub in fd.message_type.fields)
    return sorted(names)


# --- calling and checking ----------------------------------------------------------------


def on_loop(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` on the test's event loop from hypothesis's (worker) thread.

    Hypothesis drives synchronous tests; the server and its clients live on the session
    loop, so each example runs there while the test awaits the hypothesis thread.
    """
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=120)


#: Watches: streams that end only once what they watch is terminal, or never. The first
#: response is the server's whole answer to the request (it accepted it and streams the
#: current state or the cursor); reading on would only wait out the call's deadline, as
#: nothing here writes meanwhile.
OPEN_ENDED = {
    "ferrule.v1.AnalysisService.WatchAnalysis",
    "ferrule.v1.AnalysisService.WatchBatch",
    "ferrule.v1.PredictionService.WatchPredictions",
}


async def stream_responses(method: MethodDescriptor, call: Any) -> AsyncIterator[Message]:
    """The responses of a server-streaming ``call``: all of them, or the first of an
    open-ended one (then the call is cancelled)."""
    async for response in call:
        yield response
        if method.full_name in OPEN_ENDED:
            call.cancel()
            return


async def _read_stream(method: MethodDescriptor, call: Any) -> int:
    """How many responses a server-streaming ``call`` gave (see stream_responses)."""
    return len([response async for response in stream_responses(method, call)])


async def _call_once(
    client: AsyncFerruleClient, attribute: str, method: MethodDescriptor, requests: list[Message]
) -> tuple[grpc.StatusCode, int, bool]:
    """(status, responses received, whether the status came from the server itself)."""
    rpc = getattr(getattr(client, attribute), method.name)
    received = 0
    try:
        if method.client_streaming:
            async for _ in rpc(iter(requests), timeout=20):
                received += 1
        elif method.server_streaming:
            received = await _read_stream(method, rpc(requests[0], timeout=20))
        else:
            await rpc(requests[0], timeout=20)
            received = 1
    except FerruleError as error:
        return error.code, received, error.domain == "ferrule"
    except grpc.aio.AioRpcError as error:
        return error.code(), received, False
    return grpc.StatusCode.OK, received, True


async def call(
    client: AsyncFerruleClient, attribute: str, method: MethodDescriptor, requests: list[Message]
) -> tuple[grpc.StatusCode, int]:
    """Send ``requests`` (one unless client streaming); (status, responses received).

    On a client stream, a write that races the server's refusal makes grpc.aio report a
    local INTERNAL without the server's details (see ferrule.client.ingest): that call is
    repeated with its first message only, a few times at most, to see the server's status.
    """
    code, received, from_server = await _call_once(client, attribute, method, requests)
    for _ in range(5):
        if not (method.client_streaming and code in FORBIDDEN and not from_server):
            break
        # Only the first message: fewer writes left to race the refusal.
        code, received, from_server = await _call_once(client, attribute, method, requests[:1])
    return code, received


async def assert_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


CALLERS = ["admin", "a", "a-read", "a-admin", "b", "forged", "expired", "garbage", "none"]


@pytest.fixture(scope="module")
async def db(world: World) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(_dsn(world.server.database_url))
    yield conn
    await conn.close()


def text_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every path to a string field of ``descriptor`` (through nested messages and the first
    element of repeated ones), to a few levels."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for fd in descriptor.fields:
        entry = fd.message_type
        if entry is None:
            if fd.type == FieldDescriptor.TYPE_STRING:
                paths.append((fd,))
        elif (
            depth < 3
            and not entry.full_name.startswith("google.")
            and not entry.GetOptions().map_entry
        ):
            paths += [(fd, *rest) for rest in text_paths(entry, depth + 1)]
    return paths


def with_text(message: Message, path: tuple[FieldDescriptor, ...], value: str) -> None:
    """Set the string at ``path`` (creating the first element of repeated messages)."""
    *parents, leaf = path
    for fd in parents:
        message = getattr(message, fd.name).add() if fd.is_repeated else getattr(message, fd.name)
    if leaf.is_repeated:
        getattr(message, leaf.name).append(value)
    else:
        setattr(message, leaf.name, value)


async def fitting_name(method: MethodDescriptor, attribute: str, world: World) -> str:
    """The first of the tenant's names (one of each collection) that the RPC accepts as its
    parent or name: the request carrying only it is not refused for that field."""
    cls = GetMessageClass(method.input_type)
    fields = [n for n in ("parent", "name") if n in method.input_type.fields_by_name]
    one_per_kind = {name.split("/")[-2] if "/" in name[14:] else "": name for name in world.a.names}
    if method.client_streaming or not fields:
        return world.a.parent
    rpc = getattr(getattr(world.clients["admin"], attribute), method.name)
    for candidate in [world.a.parent, *one_per_kind.values()]:
        request = cls()
        for field_name in fields:
            setattr(request, field_name, candidate)
        try:
            if method.server_streaming:
                await _read_stream(method, rpc(request, timeout=20))
            else:
                await rpc(request, timeout=20)
        except InvalidArgument as refused:
            if any(f in fields for f, _ in refused.field_violations):
                continue
        except FerruleError:
            pass
        return candidate
    return world.a.parent


def targeted_requests(method: MethodDescriptor, world: World, name: str) -> list[Message]:
    """One request per string field path with only that field hostile (NUL inside, and one
    character past its column's length) and ``name`` as parent or name: so the hostile
    value reaches the database unless something refuses it first."""
    cls = GetMessageClass(method.input_type)
    requests = []
    for path in text_paths(method.input_type):
        leaf = path[-1]
        if leaf.name in ("parent", "name") and len(path) == 1:
            continue
        assert leaf.containing_type is not None
        limit = input_boundary.text_limit(leaf.containing_type.full_name, leaf.name)
        for value in ("ok\x00tail", "x" * ((limit or input_boundary.UNMAPPED_MAX_CHARS) + 1)):
            request = cls()
            for field_name in ("parent", "name"):
                if field_name in method.input_type.fields_by_name:
                    setattr(request, field_name, name)
            with_text(request, path, value)
            requests.append(request)
    return requests


@pytest.mark.parametrize(
    ("attribute", "method"), METHODS, ids=[f"{a}.{m.name}" for a, m in METHODS]
)
async def test_every_rpc_answers_hostile_input_deliberately(
    any_world: World, attribute: str, method: MethodDescriptor
) -> None:
    world = any_world
    strings = interesting_strings(world)
    requests = st.lists(
        message_strategy(
            method.input_type, strings, _all_field_names(), named=plausible_names(world)
        ),
        min_size=1,
        max_size=2,
    )
    seen: list[tuple[str, grpc.StatusCode]] = []
    # Mostly callers allowed to reach the data; every credential now and then.
    callers = st.one_of(st.sampled_from(["admin", "a", "a-admin"]), st.sampled_from(CALLERS))

    async def body(caller: str, messages: list[Message]) -> None:
        before = await world.checksum()
        code, received = await call(world.clients[caller], attribute, method, messages)
        seen.append((caller, code))
        assert code not in FORBIDDEN, f"{method.full_name} as {caller!r} -> {code.name}: {messages}"
        if code != grpc.StatusCode.OK and received == 0:
            assert await world.checksum() == before, f"refused {method.full_name} changed the data"

    @settings(
        max_examples=EXAMPLES_PER_RPC,
        # Generous: a call is bounded by its own timeout; this catches a hang, not slowness.
        deadline=timedelta(seconds=60),
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(caller=callers, messages=requests)
    def check(caller: str, messages: list[Message]) -> None:
        on_loop(loop, body(caller, messages))

    # Every text field alone, deterministically; then hypothesis's mixtures.
    name = await fitting_name(method, attribute, world)
    for request in targeted_requests(method, world, name):
        await body("admin", [request])
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check)
    assert seen
    await assert_serving(world.server.target)


def test_every_rpc_of_every_service_is_walked() -> None:
    """The descriptor walk finds every RPC (guards against an empty or partial walk), and
    every service the contract declares is walked (a new service fails here)."""
    protos = Path(__file__).resolve().parents[2] / "protos" / "ferrule" / "v1"
    declared = {
        service.full_name
        for proto in protos.glob("*.proto")
        for service in importlib.import_module(
            f"ferrule.v1.{proto.stem}_pb2"
        ).DESCRIPTOR.services_by_name.values()
    }
    assert declared == {service.full_name for service in SERVICES.values()}
    assert {m.full_name for _, m in METHODS} >= {
        "ferrule.v1.UserService.CreateUser",
        "ferrule.v1.PredictionService.StreamPredictions",
        "ferrule.v1.HealthService.GetHealthReport",
        "ferrule.v1.AnalysisService.GetAnalysisStatistics",
    }
    assert len(METHODS) == sum(len(s.methods) for s in SERVICES.values()) >= 50
    assert {m.full_name for _, m in METHODS if m.name.startswith("Watch")} == OPEN_ENDED


# --- SQL injection is data ---------------------------------------------------------------


async def test_sql_injection_strings_are_stored_and_matched_literally(
    world: World, db: asyncpg.Connection
) -> None:
    client = world.clients["a"]
    stored = []
    for i, payload in enumerate(SQL_INJECTION):
        user = await client.users.CreateUser(
            user_service_pb2.CreateUserRequest(
                parent=world.a.parent,
                user=user_service_pb2.User(
                    email=f"inject{i}-{uuid.uuid4().hex[:6]}@example.com",
                    full_name=payload,
                    role=user_service_pb2.USER_ROLE_VIEWER,
                    status=user_service_pb2.USER_STATUS_ACTIVE,
                    auth_provider=user_service_pb2.AUTH_PROVIDER_GOOGLE,
                    profile=user_service_pb2.UserProfile(bio=payload),
                ),
            )
        )
        got = await client.users.GetUser(user_service_pb2.GetUserRequest(name=user.name))
        assert got.full_name == payload and got.profile.bio == payload
        stored.append(user)
        org = await world.clients["admin"].users.CreateOrganization(
            user_service_pb2.CreateOrganizationRequest(
                organization=user_service_pb2.Organization(display_name=payload)
            )
        )
        assert org.display_name == payload
        analysis = await client.analyses.CreateAnalysis(
            analysis_service_pb2.CreateAnalysisRequest(
                parent=world.a.parent,
                analysis=analysis_service_pb2.Analysis(
                    text=payload, analysis_type=analysis_service_pb2.ANALYSIS_TYPE_KEYWORDS
                ),
            )
        )
        assert analysis.text == payload
    assert await db.fetchval("SELECT count(*) FROM users") > 0  # the table is still there

    # Search terms are matched literally: wildcards and quotes find only literal matches.
    for query in ("%' OR '1'='1", "%", "_", "' OR 1=1 --"):
        found = await client.users.SearchUsers(
            user_service_pb2.SearchUsersRequest(parent=world.a.parent, query=query)
        )
        for user in found.users:
            assert query.lower() in (user.email + " " + user.username).lower(), (query, user)
    # A filter value is matched literally: it finds the row stored with that very value,
    # never the others. (The module's world is shared: the property test above may have
    # stored rows with these values too, so the check is on what matched, not a count.)
    for payload in SQL_INJECTION:
        created = await client.predictions.CreatePrediction(
            prediction_service_pb2.CreatePredictionRequest(
                parent=world.a.parent,
                prediction=prediction_service_pb2.Prediction(
                    subject_id=payload, probability=0.5, model_name="inject", model_version="v1"
                ),
            )
        )
        listed = await client.predictions.ListPredictions(
            prediction_service_pb2.ListPredictionsRequest(
                parent=world.a.parent,
                page_size=1000,
                filter=prediction_service_pb2.PredictionFilter(subject_id=payload),
            )
        )
        assert created.name in {p.name for p in listed.predictions}, payload
        assert {p.subject_id for p in listed.predictions} == {payload}
        with pytest.raises(FerruleError) as looked_up:
            await client.users.LookupUserByEmail(
                user_service_pb2.LookupUserByEmailRequest(parent=world.a.parent, email=payload)
            )
        assert looked_up.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


# --- page tokens -------------------------------------------------------------------------


async def test_forged_and_cross_tenant_page_tokens_are_refused(world: World) -> None:
    a, b = world.a, world.b
    users_token, analyses_token, predictions_token = a.page_tokens
    a_client, b_client = world.clients["a"], world.clients["b"]

    def list_users(parent: str, token: str) -> Any:
        return user_service_pb2.ListUsersRequest(parent=parent, page_size=1, page_token=token)

    # The genuine token works for its own query and tenant.
    page = await a_client.users.ListUsers(list_users(a.parent, users_token))
    assert len(page.users) == 1

    refused: list[tuple[Any, Message]] = [
        # Another tenant's token, under that other tenant's own credentials.
        (b_client.users.ListUsers, list_users(b.parent, users_token)),
        (
            b_client.analyses.ListAnalyses,
            analysis_service_pb2.ListAnalysesRequest(
                parent=b.parent, page_size=1, page_token=analyses_token
            ),
        ),
        (
            b_client.predictions.ListPredictions,
            prediction_service_pb2.ListPredictionsRequest(
                parent=b.parent, page_size=1, page_token=predictions_token
            ),
        ),
        # A token of one query replayed against another.
        (
            a_client.analyses.ListAnalyses,
            analysis_service_pb2.ListAnalysesRequest(
                parent=a.parent, page_size=1, page_token=users_token
            ),
        ),
        (
            a_client.predictions.ListPredictions,
            prediction_service_pb2.ListPredictionsRequest(
                parent=a.parent,
                page_size=1,
                page_token=predictions_token,
                filter=prediction_service_pb2.PredictionFilter(subject_id="other"),
            ),
        ),
        # Forged: tampered, truncated, plain base64 JSON, garbage.
        (a_client.users.ListUsers, list_users(a.parent, _tampered(users_token))),
        (a_client.users.ListUsers, list_users(a.parent, users_token[:-4])),
        (
            a_client.users.ListUsers,
            list_users(a.parent, base64.urlsafe_b64encode(b'{"after": ""}').decode()),
        ),
        (a_client.users.ListUsers, list_users(a.parent, "not a token at all \x00")),
    ]
    for rpc, request in refused:
        with pytest.raises(InvalidArgument):
            await rpc(request)


# --- malformed bytes and the size limit -------------------------------------------------


async def _raw_call(
    channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes
) -> grpc.StatusCode:
    """Send ``payload`` as the request's bytes, unparsed (no client serializer)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    try:
        if method.client_streaming:
            stream_stream: Any = channel.stream_stream(path)
            async for _ in stream_stream(iter([payload]), metadata=metadata, timeout=5):
                pass
        elif method.server_streaming:
            unary_stream: Any = channel.unary_stream(path)
            async for _ in unary_stream(payload, metadata=metadata, timeout=5):
                pass
        else:
            unary_unary: Any = channel.unary_unary(path)
            await unary_unary(payload, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _one_method_per_shape() -> list[MethodDescriptor]:
    shapes: dict[tuple[bool, bool], MethodDescriptor] = {}
    for _, method in METHODS:
        shapes.setdefault((method.client_streaming, method.server_streaming), method)
    return list(shapes.values())


async def test_messages_above_the_size_limit_are_resource_exhausted(
    world: World, db: asyncpg.Connection
) -> None:
    """The limit is a channel argument of the whole server, enforced by grpc core before
    any handler runs, so one method of each shape the services have (unary or streaming
    requests and responses) stands for all: grpc pauses on every oversized message it
    refuses (a bare grpc.aio server too), which made an every-method walk the slowest
    test of the suite."""
    before = await checksum(db)
    # A well-formed request, just too big: a display name longer than the limit.
    too_big = user_service_pb2.CreateOrganizationRequest(
        organization=user_service_pb2.Organization(display_name="x" * (MAX_MESSAGE_BYTES + 1))
    ).SerializeToString()
    methods = _one_method_per_shape()
    async with grpc.aio.insecure_channel(world.server.target) as channel:
        for method in methods:
            code = await _raw_call(channel, method, too_big)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (method.full_name, code)
    assert await checksum(db) == before
    await assert_serving(world.server.target)


@pytest.mark.timeout(90)
async def test_malformed_bytes_are_refused_deliberately(world: World) -> None:
    # Not protobuf: a truncated varint, an invalid wire type, a length past the end.
    payloads = [b"\xff\xff\xff", b"\x0f", b"\x0a\x7fab"]
    async with grpc.aio.insecure_channel(world.server.target) as channel:
        for payload in payloads:
            for _, method in METHODS:
                code = await _raw_call(channel, method, payload)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, payload, code)
    await assert_serving(world.server.target)


async def test_timestamps_outside_years_1_to_9999_are_invalid_argument(world: World) -> None:
    """Timestamp.ToDatetime raises for them; every RPC must name the field instead."""
    far = timestamp_pb2.Timestamp(seconds=253402300800)  # year 10000
    client = world.clients["a"]
    calls: list[Any] = [
        client.analyses.ListAnalyses(
            analysis_service_pb2.ListAnalysesRequest(
                parent=world.a.parent,
                create_time_range=common_pb2.TimeRange(end_time=far),
            )
        ),
        client.analyses.CreateModelPerformance(
            analysis_service_pb2.CreateModelPerformanceRequest(
                parent=world.a.parent,
                model_performance=analysis_service_pb2.ModelPerformance(
                    model_name="m", model_version="1", window_start_time=far, window_end_time=far
                ),
            )
        ),
        client.predictions.ListPredictions(
            prediction_service_pb2.ListPredictionsRequest(
                parent=world.a.parent,
                filter=prediction_service_pb2.PredictionFilter(
                    predict_time_range=common_pb2.TimeRange(start_time=far)
                ),
            )
        ),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument) as info:
            await call
        assert any("time" in field for field, _ in info.value.field_violations)


async def test_durations_beyond_a_timedelta_are_invalid_argument(world: World) -> None:
    huge = duration_pb2.Duration(seconds=2**62)
    user = world.a.names[1]  # the first seeded user
    with pytest.raises(InvalidArgument) as info:
        await world.clients["a"].users.CreateUserSession(
            user_service_pb2.CreateUserSessionRequest(
                parent=user, user_session=user_service_pb2.UserSession(ttl=huge)
            )
        )
    assert [field for field, _ in info.value.field_violations] == ["user_session.ttl"]
    with pytest.raises(InvalidArgument) as info:
        await world.clients["admin"].predictions.PurgePredictions(
            prediction_service_pb2.PurgePredictionsRequest(parent=world.a.parent, older_than=huge)
        )
    assert [field for field, _ in info.value.field_violations] == ["older_than"]
