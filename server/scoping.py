"""The one place an RPC becomes a tenant-scoped database transaction.

Servicers call `authorize(pattern, name)` first: it parses the name, checks the caller's
organization against it (permission before existence), records the tenant on the call,
and returns the ids. `transaction(deps, tenant)` then opens a transaction whose
statement_timeout is the RPC's remaining deadline, so a slow query dies with its RPC.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from db.observability import bind_statement_tenant
from db.point_reads import PointReader
from db.tenancy import Tenant
from server.authorization import check_organization
from server.call_context import current_call
from server.dependencies import Dependencies
from server.names import Pattern
from server.read_routing import caller_key, router_for


def authorize(pattern: Pattern, name: str, field: str = "name") -> tuple[uuid.UUID, ...]:
    """Parse `name` against `pattern` and authorize its organization (the first id)."""
    ids = pattern.parse(name, field)
    _scope_call_to(ids[0])
    return ids


def authorize_organization(organization_id: uuid.UUID) -> Tenant:
    _scope_call_to(organization_id)
    return Tenant.of(organization_id)


def _scope_call_to(organization_id: uuid.UUID) -> None:
    """Check the caller may use the organization and record it on the call. No Tenant is
    built here: a cached Get answers without a transaction and never needs one."""
    call = current_call()
    assert call.principal is not None, "authorize() runs after authentication"
    organization = str(organization_id)
    check_organization(call.principal, organization)
    call.organization_id = organization
    bind_statement_tenant(organization)


def caller_tenant() -> Tenant:
    """For RPCs without a parent (e.g. ListOrganizations): what the token grants."""
    principal = current_call().principal
    assert principal is not None
    if principal.all_organizations:
        return Tenant.all()
    return Tenant.of(uuid.UUID(principal.organization))


def caller_subject() -> str | None:
    principal = current_call().principal
    return principal.subject if principal else None


@asynccontextmanager
async def transaction(
    deps: Dependencies, tenant: Tenant, *, read_only: bool = False, primary: bool = False
) -> AsyncIterator[AsyncSession]:
    """``primary`` keeps a read-only transaction on the primary: cache loaders use it, since
    a lagging replica's value stored in the shared cache would outlive the write."""
    timeout_ms = current_call().remaining_ms(deps.settings.ferrule_default_statement_timeout_ms)
    # Replicas serve reads, except those that would miss the caller's own recent writes.
    router = router_for(deps.database, deps.cache)  # the cache carries writes across processes
    caller = caller_key()
    engine = None
    if read_only:
        engine = deps.database.engine if primary else await router.engine_for_read(caller)
    try:
        async with deps.database.transaction(
            tenant, timeout_ms=timeout_ms, read_only=read_only, engine=engine
        ) as session:
            yield session
    finally:
        if not read_only:
            await router.wrote(caller)  # after commit (or failure): the next read must see it


def primary_point_reader(deps: Dependencies, tenant: Tenant) -> PointReader:
    """Single-row reads on the primary within the RPC's deadline (cache loaders: a
    lagging replica's value stored in the shared cache would outlive the write)."""
    timeout_ms = current_call().remaining_ms(deps.settings.ferrule_default_statement_timeout_ms)
    return deps.database.point_reader(tenant, timeout_ms=timeout_ms)
