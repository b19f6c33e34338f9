"""Tracing and metrics of the real server, seen through the real client.

One client call makes one trace: the client span, the server span under it, the SQL
spans under that. Parameter values never reach a span; the request log row carries the
trace id; the Prometheus endpoint serves the RPC histogram.
"""

from __future__ import annotations

import asyncio
import urllib.request

import asyncpg
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.v1 import user_service_pb2 as pb
from server.telemetry import setup_telemetry
from tests.polling import eventually
from tests.server.conftest import ADMIN_TOKEN, StartServer

SECRET = "hunter2-SECRET-7f3a9c"


def _attribute_text(span: ReadableSpan) -> str:
    parts = [str(v) for v in (span.attributes or {}).values()]
    for event in span.events:
        parts += [str(v) for v in (event.attributes or {}).values()]
    parts.append(span.status.description or "")
    return " ".join(parts)


async def test_one_trace_from_client_through_server_to_sql(
    start_server: StartServer, pg_database_url: str
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(exporter)]
    )
    server = await start_server(pg_database_url, telemetry=telemetry)
    client_provider = TracerProvider()
    client_provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = ClientConfig(target=server.target, token=ADMIN_TOKEN, tracer_provider=client_provider)
    async with AsyncFerruleClient(config=config) as client:
        org = await client.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name=SECRET))
        )
        exporter.clear()
        await client.users.GetOrganization(pb.GetOrganizationRequest(name=org.name))

    finished = exporter.get_finished_spans()
    client_spans = [
        s for s in finished if s.kind is SpanKind.CLIENT and s.name.endswith("GetOrganization")
    ]
    assert len(client_spans) == 1
    client_span = client_spans[0]
    # The previous call's server span may finish after the clear: look at this trace only.
    spans = [s for s in finished if s.context.trace_id == client_span.context.trace_id]
    server_spans = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(server_spans) == 1
    server_span = server_spans[0]
    assert server_span.name.endswith("GetOrganization")
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    sql_spans = [
        s for s in spans if (s.attributes or {}).get("db.system") in {"postgresql", "sqlite"}
    ]
    assert sql_spans, [s.name for s in spans]
    by_id = {s.context.span_id: s for s in spans}

    def ancestors(span: ReadableSpan) -> list[str]:
        names = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    for sql in sql_spans:
        # Under the server span, through the cache's read-through span (a miss here).
        chain = ancestors(sql)
        assert server_span.name in chain, chain
        assert chain[0] == "cache get_or_load", chain
    assert any("organizations" in str((s.attributes or {}).get("db.query.text")) for s in sql_spans)
    assert server_span.attributes is not None
    assert server_span.attributes.get("ferrule.tenant") == org.name.split("/")[1]


async def test_parameter_values_never_reach_a_span_by_default(
    start_server: StartServer, pg_database_url: str
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(exporter)]
    )
    server = await start_server(pg_database_url, telemetry=telemetry)
    admin = server.admin()
    org = await admin.users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name=SECRET))
    )
    await admin.users.UpdateOrganization(
        pb.UpdateOrganizationRequest(
            organization=pb.Organization(name=org.name, display_name=SECRET + "-2")
        )
    )
    spans = exporter.get_finished_spans()
    assert spans
    leaked = [s.name for s in spans if SECRET in _attribute_text(s)]
    assert not leaked


async def test_request_log_row_carries_the_trace_id(
    start_server: StartServer, pg_database_url: str
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(exporter)]
    )
    server = await start_server(pg_database_url, telemetry=telemetry)
    await server.admin().users.ListOrganizations(pb.ListOrganizationsRequest())
    span = next(s for s in exporter.get_finished_spans() if s.name.endswith("ListOrganizations"))
    trace_id = format(span.context.trace_id, "032x")
    conn = await asyncpg.connect(pg_database_url.replace("+asyncpg", ""))
    row: asyncpg.Record | None = None
    try:

        async def logged() -> bool:  # written in the background
            nonlocal row
            row = await conn.fetchrow(
                "SELECT trace_id, status_code, caller FROM request_log WHERE method LIKE $1",
                "%ListOrganizations",
            )
            return row is not None

        await eventually(logged, what="the request log row")
    finally:
        await conn.close()
    assert row is not None
    assert row["trace_id"] == trace_id
    assert row["status_code"] == "OK"
    assert row["caller"] == "admin-token"


async def test_metrics_endpoint_serves_the_rpc_histogram(
    start_server: StartServer, pg_database_url: str
) -> None:
    telemetry = setup_telemetry(
        environ={}, set_global=False, metrics_port=0, metrics_host="127.0.0.1"
    )
    server = await start_server(pg_database_url, telemetry=telemetry)
    await server.admin().users.ListOrganizations(pb.ListOrganizationsRequest())
    url = f"http://127.0.0.1:{telemetry.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    lines = [line for line in body.splitlines() if line.startswith("rpc_server_call_duration")]
    assert any("ListOrganizations" in line and 'grpc_status_code="OK"' in line for line in lines), (
        lines[:20]
    )
