"""Tenant isolation as a property: nothing of one organization ever reaches the other.

Two seeded organizations (test_bad_input's world: users, a session, a batch, analyses,
model performance, predictions, each value tagged with a per-tenant marker). Hypothesis
draws random sequences of RPCs (every RPC of the four services, by descriptor walk)
whose string fields are drawn mostly from both tenants' real names, ids and page tokens,
sent under one tenant's tokens. Every string and bytes value anywhere in every response
(and in error messages) is collected and must contain no id, name or marker value of
the other tenant.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from hashlib import sha256

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrule.client import AsyncFerruleClient, FerruleError
from tests.conftest import MODULE_DATABASE_FIXTURES, query
from tests.server.conftest import make_token
from tests.server.test_bad_input import (
    CHECKED_TABLES,
    METHODS,
    Tenant,
    World,
    _all_field_names,
    message_strategy,
    on_loop,
    pg_world,
    start_world,
    stream_responses,
)

pytestmark = pytest.mark.timeout(300)

STEPS_PER_EXAMPLE = 6
EXAMPLES = 40


@pytest.fixture(scope="module")
async def postgresql_world(pg_module_database_url: str) -> AsyncIterator[World]:
    async for value in pg_world(pg_module_database_url):
        yield value


@pytest.fixture(scope="module")
async def mariadb_world(mariadb_module_database_url: str) -> AsyncIterator[World]:
    url = mariadb_module_database_url

    async def row_checksum() -> dict[str, str]:
        return {
            table: f"{len(rows)}:{sha256('|'.join(sorted(map(repr, rows))).encode()).hexdigest()}"
            for table in CHECKED_TABLES
            for rows in [await query(url, f"SELECT * FROM {table}")]
        }

    async for value in start_world(url, row_checksum):
        yield value


@pytest.fixture(scope="module", params=list(MODULE_DATABASE_FIXTURES))
def world(request: pytest.FixtureRequest) -> World:
    """On PostgreSQL (RLS behind the repositories) and on MariaDB, where the repositories'
    scoping is the only wall."""
    value: World = request.getfixturevalue(f"{request.param}_world")
    return value


def strings_in(message: Message) -> Iterator[str]:
    """Every string and bytes value in ``message``, recursively (maps and Structs too)."""
    for fd, value in message.ListFields():
        values = value.values() if _is_map(fd) else value if fd.is_repeated else [value]
        for item in values:
            if isinstance(item, Message):
                yield from strings_in(item)
            elif isinstance(item, str):
                yield item
            elif isinstance(item, bytes):
                yield item.decode("utf-8", errors="replace")
        if _is_map(fd):
            yield from (str(key) for key in value)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def secrets_of(tenant: Tenant) -> list[str]:
    """What identifies a tenant's data: its id, every resource id, every marker value."""
    ids = {name.rsplit("/", 1)[1] for name in tenant.names}
    return sorted({tenant.id, *ids, *tenant.values})


async def _responses(
    client: AsyncFerruleClient, attribute: str, method: MethodDescriptor, request: Message
) -> list[str]:
    """The strings of every response (or of the error) of one call."""
    rpc = getattr(getattr(client, attribute), method.name)
    found: list[str] = []
    try:
        if method.client_streaming:
            async for response in rpc(iter([request]), timeout=20):
                found += strings_in(response)
        elif method.server_streaming:
            async for response in stream_responses(method, rpc(request, timeout=20)):
                found += strings_in(response)
        else:
            found += strings_in(await rpc(request, timeout=20))
    except FerruleError as error:
        found.append(error.message)
        for detail in error.details:
            found += strings_in(detail)
    except grpc.aio.AioRpcError as error:
        found.append(error.details() or "")
    return found


@pytest.mark.parametrize("side", ["a", "b"])
async def test_no_response_to_one_tenant_mentions_the_other(world: World, side: str) -> None:
    me, other = (world.a, world.b) if side == "a" else (world.b, world.a)
    forbidden = secrets_of(other)
    clients = {
        "rw": me.client,
        "read": world.server.client(_token(me.id, "read"), max_attempts=1),
    }
    names = me.names + other.names
    strings = st.one_of(
        st.sampled_from([*names, *me.page_tokens, *other.page_tokens, me.parent, other.parent]),
        st.sampled_from(["", "%", "_", "a", "example.com", "v1", "text"]),
    )
    field_names = _all_field_names()
    steps = st.lists(
        st.tuples(
            st.sampled_from(list(clients)),
            st.sampled_from(METHODS).flatmap(
                lambda am: st.tuples(
                    st.just(am), message_strategy(am[1].input_type, strings, field_names)
                )
            ),
        ),
        min_size=1,
        max_size=STEPS_PER_EXAMPLE,
    )

    async def body(walk: list[tuple[str, tuple[tuple[str, MethodDescriptor], Message]]]) -> None:
        for caller, ((attribute, method), request) in walk:
            # Echoing what the caller itself sent (a name in an error message) is no leak.
            sent = " ".join(strings_in(request))
            unknown = [secret for secret in forbidden if secret not in sent]
            for text in await _responses(clients[caller], attribute, method, request):
                leaked = [secret for secret in unknown if secret in text]
                assert not leaked, f"{method.full_name} as {side}/{caller} leaked {leaked}"

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(walk=steps)
    def check(walk: list[tuple[str, tuple[tuple[str, MethodDescriptor], Message]]]) -> None:
        on_loop(loop, body(walk))

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check)


def _token(organization: str, scope: str) -> str:
    return make_token(organization, scope)
