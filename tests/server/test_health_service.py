"""ferrule.v1.HealthService: the detailed report and the slow-query report, end to end."""

from __future__ import annotations

import asyncpg
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import make_url

from db.migrate import head_revision
from ferrule.client import InvalidArgument, PermissionDenied
from ferrule.v1 import health_service_pb2 as hpb
from ferrule.v1 import user_service_pb2 as upb
from server.telemetry import setup_telemetry
from tests.server.conftest import RunningServer, StartServer
from tests.template_databases import mariadb_connect

SLOW_TRIGGER = """
CREATE FUNCTION ferrule_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
CREATE TRIGGER ferrule_test_slow BEFORE INSERT ON organizations
FOR EACH ROW EXECUTE FUNCTION ferrule_test_slow();
"""


async def test_health_report_describes_database_schema_process_and_queries(
    any_server: RunningServer,
) -> None:
    admin = any_server.admin()
    await admin.users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="h"))
    )
    report = await admin.health.GetHealthReport(hpb.GetHealthReportRequest())
    assert report.status == hpb.HEALTH_STATUS_HEALTHY
    assert report.database.reachable
    assert report.database.server_version
    assert report.database.dialect == make_url(any_server.database_url).get_backend_name()
    assert report.database.pool_size >= 1
    assert report.schema.head_revision == head_revision()
    assert report.schema.current_revision == head_revision()
    assert report.schema.up_to_date
    assert report.cache.backend == "local"  # no REDIS_URL: the in-process LRU
    assert report.cache.reachable
    assert not report.cache.degraded
    assert report.process.pid > 0
    assert report.process.rss_bytes > 0
    assert report.query_statistics.total_count > 0
    assert report.query_statistics.failed_count == 0


async def test_health_reports_are_for_admins_only(db_server: RunningServer) -> None:
    """Server version, pid and every tenant's query statistics are not a tenant's business."""
    org = await db_server.admin().users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="h"))
    )
    tenant_writer = db_server.for_org(org.name.split("/")[1], scope="read write")
    with pytest.raises(PermissionDenied):
        await tenant_writer.health.GetHealthReport(hpb.GetHealthReportRequest())
    reader = db_server.for_org(org.name.split("/")[1], scope="read")
    with pytest.raises(PermissionDenied):
        await reader.health.GetSlowQueryReport(hpb.GetSlowQueryReportRequest())
    with pytest.raises(PermissionDenied):
        await reader.health.ResetSlowQueryReport(hpb.ResetSlowQueryReportRequest())


@pytest.mark.parametrize("explain", [False, True])
async def test_a_slow_statement_is_reported_with_its_trace_id_and_plan(
    start_server: StartServer, pg_database_url: str, explain: bool
) -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(spans)]
    )
    server = await start_server(
        pg_database_url,
        telemetry=telemetry,
        ferrule_slow_query_ms=200,
        ferrule_explain_slow_queries=explain,
    )
    conn = await asyncpg.connect(pg_database_url.replace("+asyncpg", ""))
    try:
        await conn.execute(SLOW_TRIGGER)
    finally:
        await conn.close()
    admin = server.admin()
    await admin.users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="slow"))
    )
    server_spans = [s for s in spans.get_finished_spans() if s.name.endswith("CreateOrganization")]
    trace_id = format(server_spans[0].context.trace_id, "032x")
    report = await admin.health.GetSlowQueryReport(
        hpb.GetSlowQueryReportRequest(top_n=5, include_explain_plans=True)
    )
    assert report.threshold.ToMilliseconds() == 200
    inserts = [e for e in report.entries if e.statement.startswith("INSERT INTO organizations")]
    assert len(inserts) == 1, [e.statement for e in report.entries]
    entry = inserts[0]
    assert entry.count == 1
    assert entry.max_duration.ToMilliseconds() >= 300
    assert trace_id in entry.sample_trace_ids
    assert entry.rpc_methods == ["ferrule.v1.UserService/CreateOrganization"]
    if explain:
        for _ in range(50):  # the plan is captured in the background, off the RPC's path
            if entry.explain_plan:
                break
            await server.app.query_observers.wait_for_explains()
            report = await admin.health.GetSlowQueryReport(
                hpb.GetSlowQueryReportRequest(top_n=5, include_explain_plans=True)
            )
            entry = next(e for e in report.entries if e.statement == entry.statement)
        assert '"Plan"' in entry.explain_plan
    else:
        assert entry.explain_plan == ""

    reset = await admin.health.ResetSlowQueryReport(hpb.ResetSlowQueryReportRequest())
    assert reset.cleared_entry_count >= 1
    after = await admin.health.GetSlowQueryReport(hpb.GetSlowQueryReportRequest())
    assert not [e for e in after.entries if e.statement.startswith("INSERT INTO organizations")]


async def test_slow_query_report_validates_its_arguments(db_server: RunningServer) -> None:
    admin = db_server.admin()
    with pytest.raises(InvalidArgument) as info:
        await admin.health.GetSlowQueryReport(hpb.GetSlowQueryReportRequest(order_by="nonsense"))
    assert info.value.field_violations[0][0] == "order_by"
    with pytest.raises(InvalidArgument):
        await admin.health.GetSlowQueryReport(hpb.GetSlowQueryReportRequest(top_n=-1))


MARIADB_SLOW_TRIGGER = """
CREATE TRIGGER ferrule_test_slow BEFORE INSERT ON organizations FOR EACH ROW
BEGIN
  IF NEW.display_name LIKE 'slow%' THEN DO SLEEP(0.4); END IF;
END
"""


async def test_a_slow_statement_on_mariadb_is_reported_with_its_trace_id(
    mariadb_database_url: str, start_server: StartServer
) -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(spans)]
    )
    server = await start_server(
        mariadb_database_url, telemetry=telemetry, ferrule_slow_query_ms=200
    )
    conn = await mariadb_connect(mariadb_database_url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(f"USE `{mariadb_database_url.rsplit('/', 1)[1]}`")
            await cursor.execute(MARIADB_SLOW_TRIGGER)
    finally:
        conn.close()
    admin = server.admin()
    await admin.users.CreateOrganization(
        upb.CreateOrganizationRequest(organization=upb.Organization(display_name="slow"))
    )
    server_spans = [s for s in spans.get_finished_spans() if s.name.endswith("CreateOrganization")]
    trace_id = format(server_spans[0].context.trace_id, "032x")
    report = await admin.health.GetSlowQueryReport(hpb.GetSlowQueryReportRequest(top_n=5))
    inserts = [e for e in report.entries if e.statement.startswith("INSERT INTO organizations")]
    assert len(inserts) == 1, [e.statement for e in report.entries]
    assert inserts[0].max_duration.ToMilliseconds() >= 400
    assert trace_id in inserts[0].sample_trace_ids
    assert inserts[0].rpc_methods == ["ferrule.v1.UserService/CreateOrganization"]
    reset = await admin.health.ResetSlowQueryReport(hpb.ResetSlowQueryReportRequest())
    assert reset.cleared_entry_count >= 1
