"""Benchmark scenarios: each a module of ``bench`` exposing ``SCENARIO``.

Adding a scenario is adding a module (``bench/cache_read.py``, ``bench/soak.py``, ...)
with ``SCENARIO = Scenario(name, run, add_arguments)``; ``python -m bench`` finds it,
runs it when selected, and merges its figures, prefixed ``"{name}."``, into the JSON
object printed on the last line.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import bench

Figures = dict[str, float | int | str]
#: Modules of the package that are infrastructure, not scenarios.
_NOT_SCENARIOS = frozenset({"__main__", "harness", "registry"})


@dataclass(frozen=True)
class Scenario:
    name: str
    #: Runs the scenario with the parsed command line; returns its figures (unprefixed).
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, Figures]]
    #: Adds the scenario's own options (prefix them with the scenario name).
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str = ""
    #: Run by ``python -m bench`` when no scenario is named.
    default: bool = True


def discover() -> dict[str, Scenario]:
    """Every scenario module in the ``bench`` package, by scenario name."""
    found: dict[str, Scenario] = {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if info.name in _NOT_SCENARIOS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        scenario = getattr(module, "SCENARIO", None)
        if isinstance(scenario, Scenario):
            found[scenario.name] = scenario
    return found
