"""Soak scenario: mixed traffic at a steady rate for minutes; errors, latency, RSS drift.

One server subprocess (``python -m server``) on a fresh PostgreSQL database with Redis
(``REDIS_URL``, keys under a unique ``FERRULE_CACHE_PREFIX``, deleted afterwards) and
``DATABASE_APP_ROLE=ferrule_app`` (row-level security on), ``--soak-users`` users seeded.

**Open loop.** Operations are *scheduled* at fixed instants so that the RPCs they send
average ``--soak-rate`` per second, whatever the server's latency (a closed loop would
slow down with the server and hide it). At most ``--soak-concurrency`` operations are in
flight; an operation whose instant comes while that many are in flight is not started
and is counted as ``dropped``; one started more than ``LATE_S`` after its instant (the
event loop was busy) is counted as ``late``. The mix, by share of operations:

========================  =====  ===================================================
operation                 share  RPCs
========================  =====  ===================================================
get_user                  60     GetUser, user drawn from a Zipf(1.1) over the seeded
list_users                 8     ListUsers, 50 a page, following ``next_page_token``
create_update_user         8     CreateUser, then UpdateUser (field mask, etag)
create_get_analysis        8     CreateAnalysis (unique text), then GetAnalysis
risk_distribution          4     GetRiskDistribution (no filter / by model version /
                                 min probability)
batch_create               2     BatchCreatePredictions of ``--soak-batch-rows`` rows
========================  =====  ===================================================

plus, in the background, one ``StreamPredictions`` through the client helper
(:class:`~ferrule.client.ingest.AsyncPredictionStreamer`) at ``--soak-stream-rate``
rows/s (a batch every half second); its acknowledgements are timed, and at the end the
rows stored must equal the rows streamed plus the rows batch-created.

**Rate.** The default, 100 RPC/s (plus 200 streamed rows/s), is a steady load that the
reference machine (2 cores shared by server, PostgreSQL, Redis and this client) carries
with headroom: the server used about 0.6 of a core. At 200 RPC/s that machine saturates
(about 180 RPC/s achieved, 64 operations queued, p50 in the hundreds of milliseconds),
which is an overload test, not a soak; raise ``--soak-rate`` on bigger machines.

**RSS.** The server's resident set is sampled every ``--soak-rss-interval`` seconds
(psutil on its pid). The *start* is the sample at the end of the warm-up
(``--soak-warmup`` seconds of the same traffic: pools and connections opened), the
*end* the last sample; the drift is end - start, and the slope is a least squares fit
over every sample after the warm-up (MiB per minute), less sensitive to one noisy
sample. Under this mix RSS keeps rising for minutes after the warm-up and then levels
off: the bounded in-process caches fill at the rate new keys arrive (the near cache and
the entity keys, from the seeded users read in turn and the users and analyses created
all along; each connection's prepared statements; parsed names), and Python's allocator
arenas settle. A leak instead keeps rising. So the *late* slope and drift
cover only the second half of the samples after the warm-up: judge flatness on them, in
a run long enough for the first half to hold the filling (15 minutes or more at the
default rate). Latency, calls and errors cover the whole run, warm-up included.

Figures (``soak.*``): ``calls``, ``errors``, ``achieved_rps`` vs ``target_rps``,
``dropped``/``late``, ``p50_ms``/``p99_ms``/``max_ms`` overall and per RPC
(``soak.GetUser.p99_ms``, ...), errors per RPC and code
(``soak.errors.GetUser.UNAVAILABLE``, only when non-zero), stream rows and ack latency,
server RSS (launch, start, end, max, drift, slope) and CPU, and ``ok`` (1 when there was
no error, nothing dropped and the stored row count is exact).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil
from google.protobuf import field_mask_pb2, timestamp_pb2

from bench.harness import ServerProcess, fresh_database, org_token, server_process
from bench.ingest import count_rows
from bench.loadgen import seed_users, zipf_indexes
from bench.reads import REDIS_URL, delete_prefix
from bench.registry import Figures, Scenario
from ferrule.client import AsyncFerruleClient, ClientConfig
from ferrule.client.errors import FerruleError
from ferrule.client.ingest import AsyncPredictionStreamer
from ferrule.v1 import analysis_service_pb2 as analysis_pb
from ferrule.v1 import prediction_service_pb2 as prediction_pb
from ferrule.v1 import user_service_pb2 as user_pb

MiB = 1024 * 1024
#: An operation started this long after its scheduled instant counts as late.
LATE_S = 0.05
#: How long to wait for operations still in flight at the end before cancelling them.
DRAIN_S = 30.0
#: Per-call deadline of the soak's client.
CALL_TIMEOUT_S = 30.0
#: Stream batches are sent this often (seconds).
STREAM_PERIOD_S = 0.5

Operation = Callable[[], Awaitable[None]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--soak-seconds", type=float, default=float(env("BENCH_SOAK_SECONDS", "120")),
        help="length of the soak, warm-up included (default 120; env BENCH_SOAK_SECONDS)",
    )  # fmt: skip
    parser.add_argument(
        "--soak-rate", type=float, default=float(env("BENCH_SOAK_RATE", "100")),
        help="target unary RPCs per second (default 100; env BENCH_SOAK_RATE)",
    )  # fmt: skip
    parser.add_argument(
        "--soak-concurrency", type=int, default=64,
        help="operations in flight at most; one due beyond that is dropped (default 64)",
    )  # fmt: skip
    parser.add_argument(
        "--soak-warmup", type=float, default=None,
        help="seconds before the start RSS sample (default: a quarter of the soak, <= 20)",
    )  # fmt: skip
    parser.add_argument("--soak-users", type=int, default=10_000)
    parser.add_argument(
        "--soak-stream-rate", type=float, default=200.0,
        help="rows per second on the background StreamPredictions (0: no stream)",
    )  # fmt: skip
    parser.add_argument("--soak-batch-rows", type=int, default=50)
    parser.add_argument("--soak-rss-interval", type=float, default=2.0)
    parser.add_argument(
        "--soak-slow-query-ms", type=float, default=1000.0,
        help="FERRULE_SLOW_QUERY_MS of the server (default 1000: only outliers are logged)",
    )  # fmt: skip
    parser.add_argument(
        "--soak-app-role", default=env("BENCH_SOAK_APP_ROLE", "ferrule_app"),
        help="DATABASE_APP_ROLE of the server (row-level security on); '' for none",
    )  # fmt: skip


# --- what is measured ------------------------------------------------------------------
@dataclass
class Stats:
    """Latencies and errors per RPC, and how well the schedule was kept."""

    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    samples: dict[tuple[str, str], str] = field(default_factory=dict)
    scheduled: int = 0
    dropped: int = 0
    late: int = 0
    lags: list[float] = field(default_factory=list)

    async def timed(self, kind: str, call: Awaitable[object]) -> object:
        """Await one RPC, recording its latency (or its error, re-raised)."""
        started = time.perf_counter()
        try:
            result = await call
        except FerruleError as error:
            self.error(kind, error.code.name, str(error))
            raise
        except Exception as error:
            self.error(kind, type(error).__name__, str(error))
            raise
        self.latencies[kind].append(time.perf_counter() - started)
        return result

    def error(self, kind: str, code: str, message: str) -> None:
        self.errors[kind, code] += 1
        self.samples.setdefault((kind, code), message[:300])

    @property
    def calls(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + sum(self.errors.values())


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_figures(prefix: str, values: list[float]) -> Figures:
    ordered = sorted(values)
    return {
        f"{prefix}p50_ms": round(percentile(ordered, 0.50) * 1000, 2),
        f"{prefix}p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
        f"{prefix}max_ms": round((ordered[-1] if ordered else 0.0) * 1000, 2),
    }


@dataclass
class RssSeries:
    """(seconds since the soak began, RSS bytes) samples of the server."""

    pid: int
    interval: float
    points: list[tuple[float, int]] = field(default_factory=list)
    origin: float = field(default_factory=time.perf_counter)

    def sample(self) -> int:
        rss: int = psutil.Process(self.pid).memory_info().rss
        self.points.append((time.perf_counter() - self.origin, rss))
        return rss

    async def run(self, until: float) -> None:
        with contextlib.suppress(psutil.Error):
            while time.perf_counter() < until:
                self.sample()
                await asyncio.sleep(self.interval)

    def after(self, seconds: float) -> list[tuple[float, int]]:
        return [(t, rss) for t, rss in self.points if t >= seconds]


def slope_per_minute(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (r - mean_r) for t, r in points)
    return cov / var * 60 / MiB


# --- the traffic -----------------------------------------------------------------------
@dataclass
class Traffic:
    """The operations of the mix, over one client and one organization."""

    client: AsyncFerruleClient
    organization: uuid.UUID
    user_names: list[str]
    stats: Stats
    batch_rows: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    counter: itertools.count[int] = field(default_factory=itertools.count)
    page_token: str = ""
    batch_created_rows: int = 0

    @property
    def parent(self) -> str:
        return f"organizations/{self.organization}"

    async def get_user(self) -> None:
        name = self.user_names[next(self.counter) % len(self.user_names)]
        call = self.client.users.GetUser(user_pb.GetUserRequest(name=name))
        await self.stats.timed("GetUser", call)

    async def list_users(self) -> None:
        request = user_pb.ListUsersRequest(
            parent=self.parent, page_size=50, page_token=self.page_token
        )
        response = await self.stats.timed("ListUsers", self.client.users.ListUsers(request))
        assert isinstance(response, user_pb.ListUsersResponse)
        # Walk the pages; after the last one start again from the first.
        self.page_token = response.next_page_token

    async def create_update_user(self) -> None:
        n = next(self.counter)
        create = user_pb.CreateUserRequest(
            parent=self.parent,
            request_id=str(uuid.uuid4()),
            user=user_pb.User(
                email=f"soak-{self.run_id}-{n}@bench.example.com",
                username=f"soak{n}",
                full_name=f"Soak User {n}",
                role=user_pb.USER_ROLE_MEMBER,
                auth_provider=user_pb.AUTH_PROVIDER_GOOGLE,
            ),
        )
        user = await self.stats.timed("CreateUser", self.client.users.CreateUser(create))
        assert isinstance(user, user_pb.User)
        update = user_pb.UpdateUserRequest(
            user=user_pb.User(
                name=user.name,
                etag=user.etag,
                full_name=f"Soak User {n} (updated)",
                profile=user_pb.UserProfile(bio="soaked"),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["full_name", "profile.bio"]),
        )
        await self.stats.timed("UpdateUser", self.client.users.UpdateUser(update))

    async def create_get_analysis(self) -> None:
        n = next(self.counter)
        create = analysis_pb.CreateAnalysisRequest(
            parent=self.parent,
            request_id=str(uuid.uuid4()),
            analysis=analysis_pb.Analysis(
                text=f"soak {self.run_id} text {n}: the service was quick and helpful",
                analysis_type=analysis_pb.ANALYSIS_TYPE_SENTIMENT,
                sentiment_score=round(self.rng.uniform(-1, 1), 3),
                model_used="roberta-sentiment@2.1",
            ),
        )
        created = await self.stats.timed(
            "CreateAnalysis", self.client.analyses.CreateAnalysis(create)
        )
        assert isinstance(created, analysis_pb.Analysis)
        get = analysis_pb.GetAnalysisRequest(name=created.name)
        await self.stats.timed("GetAnalysis", self.client.analyses.GetAnalysis(get))

    async def risk_distribution(self) -> None:
        variant = next(self.counter) % 3
        if variant == 0:
            predicate = prediction_pb.PredictionFilter()
        elif variant == 1:
            predicate = prediction_pb.PredictionFilter(model_version="v3.2")
        else:
            predicate = prediction_pb.PredictionFilter(min_probability=0.7)
        request = prediction_pb.GetRiskDistributionRequest(parent=self.parent, filter=predicate)
        call = self.client.predictions.GetRiskDistribution(request)
        await self.stats.timed("GetRiskDistribution", call)

    async def batch_create(self) -> None:
        request = prediction_pb.BatchCreatePredictionsRequest(
            parent=self.parent,
            request_id=str(uuid.uuid4()),
            requests=[
                prediction_pb.CreatePredictionRequest(prediction=self.prediction())
                for _ in range(self.batch_rows)
            ],
        )
        call = self.client.predictions.BatchCreatePredictions(request)
        await self.stats.timed("BatchCreatePredictions", call)
        self.batch_created_rows += self.batch_rows

    def prediction(self) -> prediction_pb.Prediction:
        probability = self.rng.random()
        message = prediction_pb.Prediction(
            subject_id=f"emp-{self.rng.randrange(5000):05d}",
            probability=probability,
            model_name="attrition",
            model_version=self.rng.choice(("v3.1", "v3.2")),
            predict_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
        )
        message.features.update(
            {
                "tenure_months": self.rng.randint(0, 240),
                "department": self.rng.choice(("sales", "support", "ops")),
                "remote": self.rng.random() < 0.4,
            }
        )
        return message

    def mix(self) -> list[tuple[Operation, int, int]]:
        """(operation, share, RPCs it sends)."""
        return [
            (self.get_user, 60, 1),
            (self.list_users, 8, 1),
            (self.create_update_user, 8, 2),
            (self.create_get_analysis, 8, 2),
            (self.risk_distribution, 4, 1),
            (self.batch_create, 2, 1),
        ]


async def open_loop(
    traffic: Traffic, *, rate: float, seconds: float, concurrency: int, deadline: float
) -> None:
    """Start operations at fixed instants (so that RPCs average ``rate``/s) until
    ``seconds`` have passed; never more than ``concurrency`` at once."""
    mix = traffic.mix()
    total_share = sum(share for _, share, _ in mix)
    rpcs_per_op = sum(share * rpcs for _, share, rpcs in mix) / total_share
    op_rate = rate / rpcs_per_op
    # A fixed, shuffled deck of operations so the mix is exact over every 90 operations.
    deck = [op for op, share, _ in mix for _ in range(share)]
    random.Random(3).shuffle(deck)
    stats = traffic.stats
    in_flight: set[asyncio.Task[None]] = set()
    max_ops = int(seconds * op_rate) + 1
    started = time.perf_counter()

    async def guarded(operation: Operation) -> None:
        with contextlib.suppress(Exception):  # recorded by Stats.timed
            await operation()

    for k in range(max_ops):
        due = started + k / op_rate
        if due >= deadline:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        stats.scheduled += 1
        if len(in_flight) >= concurrency:
            stats.dropped += 1
            continue
        lag = time.perf_counter() - due
        stats.lags.append(lag)
        if lag > LATE_S:
            stats.late += 1
        task = asyncio.create_task(guarded(deck[k % len(deck)]))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=DRAIN_S)
        for task in pending:
            task.cancel()
            stats.error("drain", "NOT_FINISHED", f"still in flight {DRAIN_S}s after the end")
        await asyncio.gather(*pending, return_exceptions=True)


@dataclass
class StreamResult:
    rows_sent: int = 0
    accepted: int = 0
    reconnects: int = 0
    ack_latencies: list[float] = field(default_factory=list)
    error: str = ""


async def background_stream(
    client: AsyncFerruleClient, traffic: Traffic, rate: float, deadline: float
) -> StreamResult:
    """A batch every STREAM_PERIOD_S (``rate`` rows/s) until ``deadline``; then close."""
    result = StreamResult()
    sent_at: dict[str, float] = {}

    def on_ack(response: prediction_pb.StreamPredictionsResponse) -> None:
        sent = sent_at.pop(response.batch_id, None)
        if sent is not None:
            result.ack_latencies.append(time.perf_counter() - sent)

    per_batch = max(1, min(1000, round(rate * STREAM_PERIOD_S)))
    streamer = AsyncPredictionStreamer(
        client, traffic.parent, batch_size=per_batch, max_in_flight=8, on_ack=on_ack
    )
    try:
        tick = time.perf_counter()
        while tick + STREAM_PERIOD_S < deadline:
            tick += STREAM_PERIOD_S
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
            rows = [traffic.prediction() for _ in range(per_batch)]
            batch_id = f"soak-{traffic.run_id}-{result.rows_sent // per_batch}"
            sent_at[batch_id] = time.perf_counter()
            await streamer.send_batch(rows, batch_id=batch_id)
            result.rows_sent += per_batch
        await asyncio.wait_for(streamer.close(), DRAIN_S)
    except Exception as error:  # reported, and the soak is marked failed
        result.error = f"{type(error).__name__}: {error}"[:300]
        with contextlib.suppress(Exception):
            await streamer.abort()
    result.reconnects = streamer.totals.reconnects
    result.accepted = streamer.totals.accepted
    return result


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


# --- the scenario ----------------------------------------------------------------------
async def soak(server: ServerProcess, database_url: str, args: argparse.Namespace) -> Figures:
    seconds: float = args.soak_seconds
    warmup: float = args.soak_warmup if args.soak_warmup is not None else min(20.0, seconds / 4)
    organization = await server.create_organization("soak")
    ids = await seed_users(database_url, organization, args.soak_users)
    user_names = [
        f"organizations/{organization}/users/{ids[k]}" for k in zipf_indexes(len(ids), 1.1, 100_000)
    ]
    token = org_token(organization, scope="read write")
    config = ClientConfig(target=server.target, token=token, default_timeout=CALL_TIMEOUT_S)
    stats = Stats()
    async with AsyncFerruleClient(config=config) as client:
        traffic = Traffic(client, organization, user_names, stats, args.soak_batch_rows)
        rss = RssSeries(server.pid, args.soak_rss_interval)
        rss_launch = rss.sample()
        server_proc, me = psutil.Process(server.pid), psutil.Process(os.getpid())
        server_cpu, my_cpu = cpu_seconds(server_proc), cpu_seconds(me)
        began = time.perf_counter()
        rss.origin = began
        deadline = began + seconds
        sampler = asyncio.create_task(rss.run(deadline))
        stream_task = (
            asyncio.create_task(background_stream(client, traffic, args.soak_stream_rate, deadline))
            if args.soak_stream_rate > 0
            else None
        )
        progress = asyncio.create_task(report_progress(stats, began, deadline))
        try:
            await open_loop(
                traffic,
                rate=args.soak_rate,
                seconds=seconds,
                concurrency=args.soak_concurrency,
                deadline=deadline,
            )
            stream = await stream_task if stream_task is not None else StreamResult()
        finally:
            progress.cancel()
            sampler.cancel()
            await asyncio.gather(progress, sampler, return_exceptions=True)
        elapsed = time.perf_counter() - began
        with contextlib.suppress(psutil.Error):
            rss.sample()
        server_used = cpu_seconds(server_proc) - server_cpu
        my_used = cpu_seconds(me) - my_cpu
    stored = await count_rows(database_url, organization)
    expected_rows = stream.accepted + traffic.batch_created_rows
    return summarize(
        args, stats, stream, rss, rss_launch, warmup, elapsed, server_used, my_used,
        stored, expected_rows,
    )  # fmt: skip


async def report_progress(stats: Stats, began: float, deadline: float) -> None:
    """A line every 15 s, so that a long soak shows it is alive."""
    last_calls, last = 0, began
    while True:
        await asyncio.sleep(15)
        now = time.perf_counter()
        calls = stats.calls
        print(
            f"  [{now - began:5.0f} s] {(calls - last_calls) / (now - last):6.1f} RPC/s,"
            f" {sum(stats.errors.values())} errors, {stats.dropped} dropped",
            flush=True,
        )
        last_calls, last = calls, now
        if now >= deadline:
            return


def summarize(
    args: argparse.Namespace,
    stats: Stats,
    stream: StreamResult,
    rss: RssSeries,
    rss_launch: int,
    warmup: float,
    elapsed: float,
    server_cpu: float,
    client_cpu: float,
    stored: int,
    expected_rows: int,
) -> Figures:
    settled = rss.after(warmup) or rss.points[-1:]
    rss_start, rss_end = settled[0][1], settled[-1][1]
    late = settled[len(settled) // 2 :]
    rss_max = max(r for _, r in rss.points)
    errors = sum(stats.errors.values()) + (1 if stream.error else 0)
    all_latencies = [x for values in stats.latencies.values() for x in values]
    calls = stats.calls
    rows_exact = stored == expected_rows
    ok = errors == 0 and stats.dropped == 0 and rows_exact and stream.accepted == stream.rows_sent
    figures: Figures = {
        "seconds": round(elapsed, 1),
        "warmup_s": round(warmup, 1),
        "target_rps": args.soak_rate,
        "achieved_rps": round(calls / elapsed, 1),
        "calls": calls,
        "errors": errors,
        "scheduled_ops": stats.scheduled,
        "dropped": stats.dropped,
        "late": stats.late,
        "concurrency_limit": args.soak_concurrency,
        **latency_figures("", all_latencies),
        **latency_figures("schedule_lag_", stats.lags),
        "stream_rows_sent": stream.rows_sent,
        "stream_rows_accepted": stream.accepted,
        "stream_reconnects": stream.reconnects,
        **latency_figures("stream_ack_", stream.ack_latencies),
        "batch_created_rows": expected_rows - stream.accepted,
        "rows_stored": stored,
        "rows_exact": int(rows_exact),
        "server_rss_launch_mib": round(rss_launch / MiB, 1),
        "server_rss_start_mib": round(rss_start / MiB, 1),
        "server_rss_end_mib": round(rss_end / MiB, 1),
        "server_rss_max_mib": round(rss_max / MiB, 1),
        "server_rss_drift_mib": round((rss_end - rss_start) / MiB, 1),
        "server_rss_slope_mib_per_min": round(slope_per_minute(settled), 2),
        "server_rss_late_from_s": round(late[0][0], 1),
        "server_rss_late_drift_mib": round((rss_end - late[0][1]) / MiB, 1),
        "server_rss_late_slope_mib_per_min": round(slope_per_minute(late), 2),
        "server_rss_samples": len(rss.points),
        "server_cpu": round(server_cpu / elapsed, 2),
        "client_cpu": round(client_cpu / elapsed, 2),
        "app_role": args.soak_app_role or "none",
        "ok": int(ok),
    }
    for kind in sorted(stats.latencies):
        values = stats.latencies[kind]
        figures[f"{kind}.calls"] = len(values) + sum(
            n for (k, _), n in stats.errors.items() if k == kind
        )
        figures.update(latency_figures(f"{kind}.", values))
    for (kind, code), count in sorted(stats.errors.items()):
        figures[f"errors.{kind}.{code}"] = count
    if stream.error:
        figures["errors.StreamPredictions"] = stream.error
    print_summary(figures, stats, stream, sorted(stats.latencies))
    return figures


def print_summary(figures: Figures, stats: Stats, stream: StreamResult, kinds: list[str]) -> None:
    f = figures
    print(
        f"{f['calls']} calls in {f['seconds']} s: {f['achieved_rps']} RPC/s"
        f" (target {f['target_rps']}), {f['errors']} errors, {f['dropped']} dropped,"
        f" {f['late']} late (schedule lag p99 {f['schedule_lag_p99_ms']} ms)",
        flush=True,
    )
    print(
        f"latency: p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms  max {f['max_ms']} ms",
        flush=True,
    )
    for kind in kinds:
        print(
            f"  {kind:<24} {f[f'{kind}.calls']:>7} calls  p50 {f[f'{kind}.p50_ms']:>8} ms"
            f"  p99 {f[f'{kind}.p99_ms']:>8} ms  max {f[f'{kind}.max_ms']:>8} ms",
            flush=True,
        )
    print(
        f"stream: {f['stream_rows_accepted']}/{f['stream_rows_sent']} rows acknowledged,"
        f" ack p99 {f['stream_ack_p99_ms']} ms, {f['stream_reconnects']} reconnects;"
        f" rows stored {f['rows_stored']} (exact: {bool(f['rows_exact'])})",
        flush=True,
    )
    print(
        f"server RSS: launch {f['server_rss_launch_mib']} MiB, start (after"
        f" {f['warmup_s']} s warm-up) {f['server_rss_start_mib']} MiB, end"
        f" {f['server_rss_end_mib']} MiB, max {f['server_rss_max_mib']} MiB; drift"
        f" {f['server_rss_drift_mib']} MiB, slope {f['server_rss_slope_mib_per_min']} MiB/min;"
        f" late (from {f['server_rss_late_from_s']} s): drift {f['server_rss_late_drift_mib']}"
        f" MiB, slope {f['server_rss_late_slope_mib_per_min']} MiB/min",
        flush=True,
    )
    print(f"cpu: server {f['server_cpu']}  client {f['client_cpu']}", flush=True)
    for (kind, code), count in sorted(stats.errors.items()):
        print(f"  error {kind} {code} x{count}: {stats.samples[kind, code]}", flush=True)
    if stream.error:
        print(f"  stream error: {stream.error}", flush=True)
    print("soak: OK" if f["ok"] else "soak: FAILED (errors, drops or a row count off)", flush=True)


async def run(args: argparse.Namespace) -> Figures:
    prefix = f"ferrule-bench-soak-{uuid.uuid4().hex[:10]}"
    env = {
        "REDIS_URL": REDIS_URL,
        "FERRULE_CACHE_PREFIX": prefix,
        "FERRULE_SLOW_QUERY_MS": str(args.soak_slow_query_ms),
    }
    if args.soak_app_role:
        env["DATABASE_APP_ROLE"] = args.soak_app_role
    print(
        f"{args.soak_seconds:.0f} s at {args.soak_rate:.0f} RPC/s (open loop, <="
        f" {args.soak_concurrency} in flight) + a stream at {args.soak_stream_rate:.0f}"
        f" rows/s; started {datetime.now(UTC):%H:%M:%S} UTC",
        flush=True,
    )
    try:
        async with (
            fresh_database("ferrule_soak") as database_url,
            server_process(database_url, **env) as server,
        ):
            return await soak(server, database_url, args)
    finally:
        with contextlib.suppress(Exception):
            await delete_prefix(prefix)


SCENARIO = Scenario(
    name="soak",
    run=run,
    add_arguments=add_arguments,
    description="mixed traffic at a steady rate for minutes: errors, p99, server RSS drift",
)
