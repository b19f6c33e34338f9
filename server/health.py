"""Standard health checking: SERVING only while the database answers.

A background probe pings the database and flips the grpc.health.v1 status of the server
("") and of every Ferrule service, so load balancers stop routing to a replica whose
database is gone and resume by themselves when it is back.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from db.background_tasks import cancel_and_wait
from db.engine import Database

log = logging.getLogger("ferrule.health")

FERRULE_SERVICES = (
    "ferrule.v1.UserService",
    "ferrule.v1.AnalysisService",
    "ferrule.v1.PredictionService",
    "ferrule.v1.HealthService",
)

#: SERVING from start to shutdown whatever the database does: what a liveness probe asks.
#: Restarting a replica cannot bring its database back, so liveness must not follow it.
LIVENESS_SERVICE = "ferrule.liveness"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # untyped library
    """The library's servicer plus ``List``, which its aio version leaves to the base
    stub (a synchronous UNIMPLEMENTED that an asyncio server cannot run)."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {}

    async def set(self, service: str, status: int) -> None:
        self._statuses[service] = status
        await super().set(service, status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._statuses.items()
            }
        )


class HealthProbe:
    def __init__(self, database: Database, interval: float, timeout: float = 2.0) -> None:
        self.servicer = HealthServicer()
        self._database = database
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None

    async def check_once(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._database.ping()
            ok = True
        except Exception as exc:  # any failure to answer means not serving
            log.warning("database health probe failed: %s", type(exc).__name__)
            ok = False
        if ok != self.serving:
            self.serving = ok
            status = SERVING if ok else NOT_SERVING
            for service in ("", *FERRULE_SERVICES):
                await self.servicer.set(service, status)
            log.info("health: %s", "SERVING" if ok else "NOT_SERVING")
        return ok

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        await self.check_once()
        self._task = asyncio.create_task(self._run(), name="health-probe")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        await self.servicer.enter_graceful_shutdown()
