"""Ingest scenario: StreamPredictions through the client helper vs raw asyncpg COPY
(on MariaDB, ``--ingest-backend mariadb``: vs a raw asyncmy multi-row INSERT).

Same run, same rows: both paths start from the same in-memory source rows and pay their
own conversion (the stream builds ``Prediction`` messages with a ``Struct`` of features;
COPY builds records with the features as JSON text). The stream runs against a server
subprocess on a fresh database; COPY goes from this process (as the database owner)
straight into the same ``predictions`` table, paying its indexes, checks and foreign
key, before and after the streams (their mean is the reference). A stricter reference,
COPY into a bare copy of the table (``LIKE predictions INCLUDING ALL``: indexes and
checks but no foreign key and no row-level security), is reported too.
Also measured: server RSS during the stream, BatchCreatePredictions (1000 rows per
call) and one CreatePrediction per row.

On MariaDB the reference is the fastest plain client write of the same rows: asyncmy
multi-row ``INSERT`` statements of 1000 rows, committed every 4 statements (the stream's
group commit holds up to 4 batches of 1000), before, between and after the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from bench.harness import (
    RssSampler,
    ServerProcess,
    driverless,
    fresh_database,
    fresh_mariadb_database,
    mariadb_connection,
    org_token,
    server_process,
)
from bench.registry import Figures, Scenario
from ferrule.client.ingest import AsyncPredictionStreamer
from ferrule.v1 import prediction_service_pb2 as pb

MiB = 1024 * 1024
#: Distinct source rows; row i is POOL[i % len(POOL)] (keeps the bench's own memory flat).
POOL_SIZE = 10_000
COPY_COLUMNS = (
    "id",
    "organization_id",
    "subject_id",
    "probability",
    "risk_level",
    "model_name",
    "model_version",
    "features",
    "predict_time",
    "request_id",
    "create_time",
    "create_by",
)

SourceRow = tuple[str, float, str, str, dict[str, Any], datetime, int, int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--ingest-rows", type=int, default=int(env("BENCH_INGEST_ROWS", "200000")),
        help="rows streamed and copied (default 200000; env BENCH_INGEST_ROWS)",
    )  # fmt: skip
    parser.add_argument(
        "--ingest-batch-create-rows", type=int,
        default=int(env("BENCH_INGEST_BATCH_CREATE_ROWS", "20000")),
        help="rows sent with BatchCreatePredictions (1000 per call)",
    )  # fmt: skip
    parser.add_argument(
        "--ingest-create-rows", type=int, default=int(env("BENCH_INGEST_CREATE_ROWS", "2000")),
        help="rows sent with one CreatePrediction each",
    )  # fmt: skip
    parser.add_argument(
        "--ingest-create-concurrency", type=int, default=8,
        help="CreatePrediction calls in flight",
    )  # fmt: skip
    parser.add_argument(
        "--ingest-app-role", default=env("BENCH_INGEST_APP_ROLE", "ferrule_app"),
        help="DATABASE_APP_ROLE of the server (row-level security on); '' for none",
    )  # fmt: skip
    parser.add_argument(
        "--ingest-backend", choices=("postgresql", "mariadb"),
        default=env("BENCH_INGEST_BACKEND", "postgresql"),
        help="database the server runs on (env BENCH_INGEST_BACKEND)",
    )  # fmt: skip
    parser.add_argument("--ingest-batch-size", type=int, default=1000)
    parser.add_argument("--ingest-in-flight", type=int, default=8)


def source_pool(size: int = POOL_SIZE, seed: int = 7) -> list[SourceRow]:
    """Realistic rows: a subject, a probability, model, ~8 mixed-type features, a time."""
    rng = random.Random(seed)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    departments = ["engineering", "sales", "support", "finance", "ops"]
    pool: list[SourceRow] = []
    for i in range(size):
        probability = rng.random()
        features: dict[str, Any] = {
            "tenure_months": rng.randint(0, 240),
            "salary_band": f"B{rng.randint(1, 9)}",
            "overtime_hours": round(rng.uniform(0, 30), 2),
            "satisfaction": round(rng.random(), 3),
            "department": rng.choice(departments),
            "remote": rng.random() < 0.4,
            "last_promotion_months": rng.randint(0, 60),
            "manager_changes": rng.randint(0, 5),
        }
        when = base + timedelta(seconds=rng.randint(0, 86400 * 180))
        seconds = int(when.timestamp())
        pool.append((f"emp-{i:06d}", probability, "attrition", "v3.2", features, when, seconds, 0))
    return pool


def risk_of(probability: float) -> str:
    return "LOW" if probability < 0.3 else "MEDIUM" if probability < 0.7 else "HIGH"


def messages(
    pool: list[SourceRow], rows: int, features_as: str = "struct"
) -> Iterator[pb.Prediction]:
    """What a client does: one Prediction per source row, the features as a ``Struct``
    (``features_as="struct"``) or as JSON text in ``features_json`` (``"json"``)."""
    size = len(pool)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    as_json = features_as == "json"
    for i in range(rows):
        subject, probability, model, version, features, _, seconds, nanos = pool[i % size]
        message = pb.Prediction(
            subject_id=subject,
            probability=probability,
            model_name=model,
            model_version=version,
            predict_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        )
        if as_json:
            message.features_json = dumps(features)
        else:
            message.features.update(features)
        yield message


def copy_records(
    pool: list[SourceRow], rows: int, organization: uuid.UUID
) -> Iterator[tuple[Any, ...]]:
    """What raw COPY needs from the same source rows (features as JSON text)."""
    size = len(pool)
    now = datetime.now(UTC)
    dumps = json.dumps
    for i in range(rows):
        subject, probability, model, version, features, when, _, _ = pool[i % size]
        yield (
            uuid.uuid4(),
            organization,
            subject,
            probability,
            risk_of(probability),
            model,
            version,
            dumps(features),
            when,
            f"copy-{i // 1000}",
            now,
            "bench",
        )


async def measure_copy(
    database_url: str, pool: list[SourceRow], rows: int, *, bare: bool = False
) -> float:
    """Rows/s of one raw COPY of ``rows`` rows into ``predictions`` (or a bare copy)."""
    conn = await asyncpg.connect(driverless(database_url))
    try:
        organization = await conn.fetchval(
            "INSERT INTO organizations (id, display_name, version) VALUES ($1, 'copy', 1)"
            " RETURNING id",
            uuid.uuid4(),
        )
        table = "predictions"
        if bare:
            table = "bench_copy"
            await conn.execute("CREATE TABLE bench_copy (LIKE predictions INCLUDING ALL)")
        started = time.perf_counter()
        await conn.copy_records_to_table(
            table, records=copy_records(pool, rows, organization), columns=COPY_COLUMNS
        )
        elapsed = time.perf_counter() - started
        count = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE organization_id = $1", organization
        )
        assert count == rows, (count, rows)
        if bare:
            await conn.execute("DROP TABLE bench_copy")
        return rows / elapsed
    finally:
        await conn.close()


async def measure_stream(
    server: ServerProcess,
    organization: uuid.UUID,
    pool: list[SourceRow],
    args: Any,
    features_as: str = "struct",
) -> tuple[float, int]:
    rows = args.ingest_rows
    async with server.client(org_token(organization)) as client:
        streamer = AsyncPredictionStreamer(
            client,
            f"organizations/{organization}",
            batch_size=args.ingest_batch_size,
            max_in_flight=args.ingest_in_flight,
        )
        started = time.perf_counter()
        await streamer.add_many(messages(pool, rows, features_as))
        totals = await streamer.close()
        elapsed = time.perf_counter() - started
    if totals.accepted != rows:
        raise RuntimeError(f"stream accepted {totals.accepted} of {rows} rows: {totals}")
    return rows / elapsed, totals.reconnects


async def measure_batch_create(
    server: ServerProcess, organization: uuid.UUID, pool: list[SourceRow], rows: int
) -> float:
    parent = f"organizations/{organization}"
    source = list(messages(pool, rows))
    async with server.client(org_token(organization)) as client:
        started = time.perf_counter()
        for start in range(0, rows, 1000):
            request = pb.BatchCreatePredictionsRequest(
                parent=parent,
                requests=[
                    pb.CreatePredictionRequest(parent=parent, prediction=p)
                    for p in source[start : start + 1000]
                ],
            )
            await client.predictions.BatchCreatePredictions(request)
        elapsed = time.perf_counter() - started
    return rows / elapsed


async def measure_create(
    server: ServerProcess,
    organization: uuid.UUID,
    pool: list[SourceRow],
    rows: int,
    concurrency: int,
) -> float:
    parent = f"organizations/{organization}"
    source = iter(list(messages(pool, rows)))

    async with server.client(org_token(organization)) as client:

        async def worker() -> None:
            for prediction in source:
                await client.predictions.CreatePrediction(
                    pb.CreatePredictionRequest(parent=parent, prediction=prediction)
                )

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return rows / elapsed


def measure_wire_formats(pool: list[SourceRow]) -> dict[str, float]:
    """Per-row cost (µs) of the features as a Struct vs as JSON text, both directions.

    Struct: the client's ``Struct.update`` and the server's shared validation walk
    (``features_to_dict``) plus the JSON text jsonb needs. JSON text (``features_json``):
    the client's ``json.dumps`` and the server's validating parse (the text itself goes
    to jsonb unchanged).
    """
    from google.protobuf import struct_pb2

    from server.services.prediction_rows import features_json_to_dict, features_to_dict

    features = [row[4] for row in pool]
    structs = []
    started = time.perf_counter()
    for item in features:
        struct = struct_pb2.Struct()
        struct.update(item)
        structs.append(struct)
    struct_build = time.perf_counter() - started
    encode = json.JSONEncoder(separators=(",", ":")).encode
    started = time.perf_counter()
    for struct in structs:
        encode(features_to_dict(struct, []))
    struct_read = time.perf_counter() - started
    started = time.perf_counter()
    texts = [json.dumps(item) for item in features]
    json_build = time.perf_counter() - started

    started = time.perf_counter()
    for text in texts:
        features_json_to_dict(text, [])  # the text itself goes to jsonb unchanged
    json_read = time.perf_counter() - started
    per_row = 1e6 / len(features)
    return {
        "struct_client_us_per_row": round(struct_build * per_row, 2),
        "struct_server_us_per_row": round(struct_read * per_row, 2),
        "json_text_client_us_per_row": round(json_build * per_row, 2),
        "json_text_server_us_per_row": round(json_read * per_row, 2),
    }


async def count_rows(database_url: str, organization: uuid.UUID) -> int:
    conn = await asyncpg.connect(driverless(database_url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM predictions WHERE organization_id = $1", organization
        )
        return count
    finally:
        await conn.close()


#: Rows per raw INSERT statement and statements per commit (MariaDB reference).
RAW_INSERT_ROWS = 1000
RAW_INSERTS_PER_COMMIT = 4


async def measure_raw_insert(database_url: str, pool: list[SourceRow], rows: int) -> float:
    """Rows/s of raw asyncmy multi-row INSERTs of ``rows`` rows into ``predictions``."""
    conn = await mariadb_connection(database_url, database_url.rpartition("/")[2])
    try:
        organization = uuid.uuid4()
        async with conn.cursor() as cursor:
            await cursor.execute(
                "INSERT INTO organizations (id, display_name, version) VALUES (%s, 'raw', 1)",
                (str(organization),),
            )
            await conn.commit()
            placeholders = "(" + ", ".join(["%s"] * len(COPY_COLUMNS)) + ")"
            prefix = f"INSERT INTO predictions ({', '.join(COPY_COLUMNS)}) VALUES "
            records = copy_records(pool, rows, organization)
            started = time.perf_counter()
            statements = 0
            while chunk := [r for _, r in zip(range(RAW_INSERT_ROWS), records, strict=False)]:
                values = [
                    str(v)
                    if isinstance(v, uuid.UUID)
                    else v.replace(tzinfo=None)
                    if isinstance(v, datetime)
                    else v
                    for record in chunk
                    for v in record
                ]
                await cursor.execute(prefix + ", ".join([placeholders] * len(chunk)), values)
                statements += 1
                if statements % RAW_INSERTS_PER_COMMIT == 0:
                    await conn.commit()
            await conn.commit()
            elapsed = time.perf_counter() - started
            await cursor.execute(
                "SELECT count(*) FROM predictions WHERE organization_id = %s", (str(organization),)
            )
            (count,) = await cursor.fetchone()
        assert count == rows, (count, rows)
        return rows / elapsed
    finally:
        conn.close()


async def count_mariadb_rows(database_url: str, organization: uuid.UUID) -> int:
    conn = await mariadb_connection(database_url, database_url.rpartition("/")[2])
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT count(*) FROM predictions WHERE organization_id = %s", (str(organization),)
            )
            (count,) = await cursor.fetchone()
        return int(count)
    finally:
        conn.close()


async def run_mariadb(args: argparse.Namespace) -> Figures:
    """The stream on MariaDB against raw asyncmy multi-row INSERTs, in the same run."""
    rows: int = args.ingest_rows
    pool = source_pool()
    figures: Figures = {"rows": rows, "backend": "mariadb"}
    async with fresh_mariadb_database() as database_url, server_process(database_url) as server:
        # Raw inserts before, between and after the streams: the machine's load drifts, so
        # each stream is compared with the mean of the raw runs on either side of it.
        raw = [await measure_raw_insert(database_url, pool, rows)]
        print(f"raw asyncmy INSERT:          {raw[-1]:>10,.0f} rows/s", flush=True)
        rates: dict[str, float] = {}
        ratios: dict[str, float] = {}
        for features_as in ("struct", "json"):
            organization = await server.create_organization(f"stream-{features_as}")
            rates[features_as], reconnects = await measure_stream(
                server, organization, pool, args, features_as=features_as
            )
            stored = await count_mariadb_rows(database_url, organization)
            if stored != rows or reconnects:
                raise RuntimeError(f"{stored} rows stored of {rows}, {reconnects} reconnects")
            print(f"StreamPredictions ({features_as}):  {rates[features_as]:>10,.0f} rows/s")
            raw.append(await measure_raw_insert(database_url, pool, rows))
            print(f"raw asyncmy INSERT:          {raw[-1]:>10,.0f} rows/s", flush=True)
            ratios[features_as] = 2 * rates[features_as] / (raw[-2] + raw[-1])
        print(
            f"stream / neighbouring raw INSERTs: Struct {ratios['struct']:.1%},"
            f" JSON {ratios['json']:.1%}",
            flush=True,
        )
    figures.update(
        {
            "raw_insert_rows_per_s": " / ".join(str(round(rate)) for rate in raw),
            "stream_rows_per_s": round(rates["struct"]),
            "stream_json_rows_per_s": round(rates["json"]),
            "ratio_vs_raw_insert": round(ratios["struct"], 3),
            "ratio_json_vs_raw_insert": round(ratios["json"], 3),
        }
    )
    return figures


async def run(args: argparse.Namespace) -> Figures:
    if args.ingest_backend == "mariadb":
        return await run_mariadb(args)
    rows: int = args.ingest_rows
    pool = source_pool()
    figures: Figures = {"rows": rows}
    env = {"DATABASE_APP_ROLE": args.ingest_app_role} if args.ingest_app_role else {}
    async with fresh_database() as database_url, server_process(database_url, **env) as server:
        copy_rate = await measure_copy(database_url, pool, rows)
        print(f"raw asyncpg COPY:            {copy_rate:>10,.0f} rows/s", flush=True)

        organization = await server.create_organization("stream")
        sampler = RssSampler(server.pid)
        rss_start = sampler.sample()
        sampler.start()
        stream_rate, reconnects = await measure_stream(server, organization, pool, args)
        await sampler.stop()
        rss_end = sampler.samples[-1]
        stored = await count_rows(database_url, organization)
        if stored != rows:
            raise RuntimeError(f"{stored} rows stored, {rows} streamed")
        ratio = stream_rate / copy_rate
        print(f"StreamPredictions (Struct):  {stream_rate:>10,.0f} rows/s", flush=True)
        print(f"stream / COPY:               {ratio:>10.1%}", flush=True)
        print(
            f"server RSS: start {rss_start / MiB:.0f} MiB, peak {sampler.peak / MiB:.0f} MiB,"
            f" end {rss_end / MiB:.0f} MiB",
            flush=True,
        )
        organization = await server.create_organization("stream-json")
        json_rate, json_reconnects = await measure_stream(
            server, organization, pool, args, features_as="json"
        )
        reconnects += json_reconnects
        stored = await count_rows(database_url, organization)
        if stored != rows:
            raise RuntimeError(f"{stored} rows stored, {rows} streamed (features_json)")
        json_ratio = json_rate / copy_rate
        print(f"StreamPredictions (JSON):    {json_rate:>10,.0f} rows/s", flush=True)
        print(f"stream (JSON) / COPY:        {json_ratio:>10.1%}", flush=True)
        copy_again = await measure_copy(database_url, pool, rows)
        print(f"raw asyncpg COPY (again):    {copy_again:>10,.0f} rows/s", flush=True)
        copy_bare = await measure_copy(database_url, pool, rows, bare=True)
        print(f"raw COPY, bare table:        {copy_bare:>10,.0f} rows/s", flush=True)
        mean_copy = (copy_rate + copy_again) / 2
        print(
            f"stream / mean COPY: Struct {stream_rate / mean_copy:.1%},"
            f" JSON {json_rate / mean_copy:.1%}; vs bare-table COPY: Struct"
            f" {stream_rate / copy_bare:.1%}, JSON {json_rate / copy_bare:.1%}",
            flush=True,
        )

        organization = await server.create_organization("batch")
        batch_rate = await measure_batch_create(
            server, organization, pool, args.ingest_batch_create_rows
        )
        print(f"BatchCreatePredictions:      {batch_rate:>10,.0f} rows/s", flush=True)
        create_rate = await measure_create(
            server, organization, pool, args.ingest_create_rows, args.ingest_create_concurrency
        )
        print(
            f"CreatePrediction per row:    {create_rate:>10,.0f} rows/s"
            f" ({args.ingest_create_concurrency} calls in flight)",
            flush=True,
        )
    wire = measure_wire_formats(pool)
    print(
        "features wire format, us/row (client + server): Struct"
        f" {wire['struct_client_us_per_row']} + {wire['struct_server_us_per_row']},"
        f" JSON text {wire['json_text_client_us_per_row']} + {wire['json_text_server_us_per_row']}",
        flush=True,
    )
    figures.update(wire)
    figures.update(
        {
            "copy_rows_per_s": round(copy_rate),
            "stream_rows_per_s": round(stream_rate),
            "ratio": round(ratio, 3),
            "stream_json_rows_per_s": round(json_rate),
            "ratio_json": round(json_ratio, 3),
            "copy_again_rows_per_s": round(copy_again),
            "ratio_vs_mean_copy": round(2 * stream_rate / (copy_rate + copy_again), 3),
            "ratio_json_vs_mean_copy": round(2 * json_rate / (copy_rate + copy_again), 3),
            "copy_bare_rows_per_s": round(copy_bare),
            "ratio_vs_bare_copy": round(stream_rate / copy_bare, 3),
            "ratio_json_vs_bare_copy": round(json_rate / copy_bare, 3),
            "stream_reconnects": reconnects,
            "server_rss_start_mib": round(rss_start / MiB, 1),
            "server_rss_peak_mib": round(sampler.peak / MiB, 1),
            "server_rss_end_mib": round(rss_end / MiB, 1),
            "batch_create_rows_per_s": round(batch_rate),
            "create_rows_per_s": round(create_rate),
            "create_concurrency": args.ingest_create_concurrency,
            "app_role": args.ingest_app_role or "none",
        }
    )
    return figures


SCENARIO = Scenario(
    name="ingest",
    run=run,
    add_arguments=add_arguments,
    description="StreamPredictions via the client helper vs raw COPY; unary create rates",
)
