"""Cache-hit scenario: the CPU one warm read costs in the cache layer alone.

``db.cache`` against the shared Redis (keys under a unique prefix, deleted afterwards):
100 keys filled once, then
``--cache-hits-reads`` reads from 16 concurrent tasks on uvloop, in a child process so
that its CPU time is the cache's. With ``--cache-hits-reference-tree`` (a checkout of
another revision, e.g. a git worktree of main) the same child runs that tree's
``db.cache`` too, interleaved round by round, so both see the same machine.

The child uses only ``create_cache``, ``CacheKey``, ``get_or_load``, ``stats`` and
``close``, which every revision since the cache existed has, and is passed as source
(``python -c``) so the reference tree needs no copy of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

from bench.harness import ROOT
from bench.reads import REDIS_URL, delete_prefix
from bench.registry import Figures, Scenario

_CHILD = """
import asyncio, json, sys, time
import uvloop
from db.cache import CacheKey, create_cache

async def main(url, prefix, reads):
    cache = create_cache(url, prefix=prefix, timeout_ms=500, local_max_entries=10)
    keys = [CacheKey("user", "org", f"u{i}") for i in range(100)]
    value = b"x" * 300

    async def load():
        return value

    for key in keys:
        await cache.get_or_load(key, load, 300)
    await asyncio.sleep(0.5)  # a near cache's listener subscribes
    for key in keys:
        await cache.get_or_load(key, load, 300)
    hits_before = cache.stats().hits

    async def worker(w):
        for i in range(reads // 16):
            await cache.get_or_load(keys[(w * 7 + i) % 100], load, 300)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(16)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    hits = cache.stats().hits - hits_before
    await cache.close()
    done = reads // 16 * 16
    print(json.dumps({"cpu_us": cpu / done * 1e6, "rps": done / wall, "hit_share": hits / done}))

uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--cache-hits-reads", type=int, default=20_000)
    parser.add_argument(
        "--cache-hits-rounds", type=int, default=int(env("BENCH_CACHE_HITS_ROUNDS", "5"))
    )
    parser.add_argument(
        "--cache-hits-reference-tree", default=env("BENCH_CACHE_HITS_REFERENCE_TREE", ""),
        help="a checkout of another revision: its db.cache is measured too, interleaved",
    )  # fmt: skip


def _child(tree: Path, prefix: str, reads: int) -> dict[str, float]:
    """One measurement in a fresh process running ``tree``'s code."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, REDIS_URL, prefix, str(reads)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        check=True,
        timeout=120,
    )
    result: dict[str, float] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


async def run(args: argparse.Namespace) -> Figures:
    trees = {"this": ROOT}
    if args.cache_hits_reference_tree:
        trees["reference"] = Path(args.cache_hits_reference_tree)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    prefix = f"ferrule-bench-{uuid.uuid4().hex[:10]}"
    try:
        for round_number in range(args.cache_hits_rounds):
            for name, tree in trees.items():
                result = await asyncio.to_thread(
                    _child, tree, f"{prefix}-{name}", args.cache_hits_reads
                )
                results[name].append(result)
                print(
                    f"[round {round_number + 1}] {name:<10} {result['cpu_us']:6.2f} us of CPU"
                    f" per hit  {result['rps']:>9,.0f} hits/s"
                    f"  (hit share {result['hit_share']:.0%})",
                    flush=True,
                )
    finally:
        with contextlib.suppress(Exception):
            await delete_prefix(prefix)
    figures: Figures = {"reads": args.cache_hits_reads, "rounds": args.cache_hits_rounds}
    for name, rounds in results.items():
        figures[f"{name}_cpu_us_per_hit"] = round(statistics.median(r["cpu_us"] for r in rounds), 2)
        figures[f"{name}_hits_per_s"] = round(statistics.median(r["rps"] for r in rounds))
    if "reference" in results:
        figures["cpu_ratio_vs_reference"] = round(
            float(figures["this_cpu_us_per_hit"]) / float(figures["reference_cpu_us_per_hit"]), 3
        )
    return figures


SCENARIO = Scenario(
    name="cache_hits",
    run=run,
    add_arguments=add_arguments,
    description="CPU per warm read in db.cache (Redis), optionally against another revision",
    default=False,
)
