"""``python -m bench [scenario ...]`` (``make bench``): run benchmark scenarios.

Each scenario prints its figures as it goes; the last line of output is one JSON object
holding every figure of every scenario run (``"{scenario}.{figure}"``), so that runs can
be compared by machine. Scenarios live in their own modules (see bench/registry.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.registry import Figures, discover


def main(argv: list[str] | None = None) -> int:
    scenarios = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        help=f"scenarios to run (default: every default one): {', '.join(scenarios)}",
    )
    for scenario in scenarios.values():
        if scenario.add_arguments is not None:
            scenario.add_arguments(parser.add_argument_group(scenario.name))  # type: ignore[arg-type]
    args = parser.parse_args(argv)
    names = args.scenarios or [name for name, s in scenarios.items() if s.default]
    unknown = [name for name in names if name not in scenarios]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    figures: Figures = {}
    for name in names:
        print(f"== {name}: {scenarios[name].description}", flush=True)
        started = time.perf_counter()
        result = asyncio.run(scenarios[name].run(args))
        figures.update({f"{name}.{key}": value for key, value in result.items()})
        figures[f"{name}.wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
