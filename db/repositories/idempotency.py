"""AIP-155 idempotency keys: the stored first response of a create, by request id."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from db.models.idempotency import IdempotencyKey, IngestBatch
from db.repositories.base import bounded, domain_errors, scope_to_tenant
from db.tenancy import Tenant


class IdempotencyRepository:
    RESOURCE_TYPE: ClassVar[str] = "ferrule.v1.IdempotencyKey"

    def __init__(self, session: AsyncSession, tenant: Tenant) -> None:
        self.session = session
        self.tenant = tenant

    async def get(self, method: str, request_id: str) -> bytes | None:
        stmt = scope_to_tenant(
            select(IdempotencyKey.response).where(
                IdempotencyKey.method == method, IdempotencyKey.request_id == request_id
            ),
            IdempotencyKey.organization_id,
            self.tenant,
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def put(
        self, method: str, request_id: str, response: bytes, resource_name: str | None = None
    ) -> None:
        """Store the first response; AlreadyExistsError if a concurrent call stored one first."""
        self.session.add(
            IdempotencyKey(
                organization_id=self.tenant.require_organization(),
                method=method,
                request_id=request_id,
                resource_name=resource_name,
                response=response,
            )
        )
        async with domain_errors(self.RESOURCE_TYPE, request_id):
            await self.session.flush()

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 1000) -> int:
        """Forget up to ``limit`` request ids recorded before ``cutoff``; returns how many.

        Retries arrive within minutes; keys only need to outlive the clients' retry window.
        """
        key = tuple_(
            IdempotencyKey.organization_id, IdempotencyKey.method, IdempotencyKey.request_id
        )
        victims = scope_to_tenant(
            select(*key.clauses).where(IdempotencyKey.create_time < cutoff).limit(limit),
            IdempotencyKey.organization_id,
            self.tenant,
        )
        result = await self.session.execute(
            delete(IdempotencyKey)
            .where(key.in_(bounded(victims)))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


class IngestBatchRepository:
    """Retention of streamed batch records (ingest itself writes them; see prediction_ingest)."""

    def __init__(self, session: AsyncSession, tenant: Tenant) -> None:
        self.session = session
        self.tenant = tenant

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 1000) -> int:
        """Forget up to ``limit`` batch ids acknowledged before ``cutoff``; returns how many.

        A batch re-sent after its record is gone still writes nothing twice: its rows'
        ids (client-chosen or derived from the batch id) collide with the stored rows.
        """
        key = tuple_(IngestBatch.organization_id, IngestBatch.batch_id)
        victims = scope_to_tenant(
            select(*key.clauses).where(IngestBatch.create_time < cutoff).limit(limit),
            IngestBatch.organization_id,
            self.tenant,
        )
        result = await self.session.execute(
            delete(IngestBatch)
            .where(key.in_(bounded(victims)))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
