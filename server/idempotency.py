"""AIP-155 request ids: a retried create returns the first result and writes nothing.

The first call stores its serialized response in the same transaction as its write, so
either both exist or neither. Secret fields of the response (a session token) are
cleared in the stored copy: a replay answers without them, and the idempotency table
never holds a secret in plain text. Two concurrent calls with one request id race on the
idempotency key's primary key; the loser re-reads the winner's response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from db.errors import AlreadyExistsError
from db.repositories.idempotency import IdempotencyRepository
from db.tenancy import Tenant
from server.call_context import current_call
from server.dependencies import Dependencies
from server.names import parse_resource_id
from server.scoping import transaction

M = TypeVar("M", bound=Message)


async def idempotent(
    deps: Dependencies,
    tenant: Tenant,
    request_id: str,
    response_type: type[M],
    create: Callable[[AsyncSession], Awaitable[M]],
    *,
    secret_fields: tuple[str, ...] = (),
) -> M:
    """Run `create` in a transaction, once per (organization, RPC, request_id).

    ``secret_fields`` are returned by the first call only: a replay gets the stored
    response, which never held them."""
    if not request_id:
        async with transaction(deps, tenant) as session:
            return await create(session)
    parse_resource_id(request_id, "request_id")
    method = current_call().method
    for attempt in range(2):
        try:
            async with transaction(deps, tenant) as session:
                keys = IdempotencyRepository(session, tenant)
                stored = await keys.get(method, request_id)
                if stored is not None:
                    return response_type.FromString(stored)
                result = await create(session)
                await keys.put(method, request_id, _without(result, secret_fields))
                return result
        except AlreadyExistsError as exc:
            # Lost the race to a concurrent call with the same request id: replay its result.
            if attempt == 0 and exc.resource_type == IdempotencyRepository.RESOURCE_TYPE:
                continue
            raise
    raise AssertionError("unreachable")


def _without(response: Message, secret_fields: tuple[str, ...]) -> bytes:
    if not secret_fields:
        return response.SerializeToString()
    stored = type(response)()
    stored.CopyFrom(response)
    for field in secret_fields:
        stored.ClearField(field)
    return stored.SerializeToString()
