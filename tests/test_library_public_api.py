"""Ferrule uses its libraries through their public API only.

Private names (a ``_``-prefixed module, class, function or attribute) change without
notice between releases; code built on them pins the library and breaks on upgrade. So no
module of the server, the database layer, the migrations, the benchmarks, the client
package or the tests may import one from a library below or read one off a library's
module or class, nor reach an attribute by a private name given as a string
(``getattr(pool, "_do_get")``), the way instance internals are reached. OpenTelemetry
classes may be subclassed only where the SDK documents it (exporters, processors,
samplers, propagators), and no private hook of one overridden.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("server", "db", "migrations", "bench", "client/ferrule", "tests")
#: The libraries checked: their top-level package (or namespace package and package).
LIBRARIES = (
    "opentelemetry",
    "sqlalchemy",
    "alembic",
    "grpc",
    "google.protobuf",
    "redis",
    "asyncpg",
    "asyncmy",
    "aiosqlite",
)
#: Builtins that reach an attribute by a name given as a string.
BY_NAME = frozenset({"getattr", "setattr", "hasattr", "delattr"})

#: The SDK's extension interfaces: made to be subclassed, through their public methods.
EXTENSION_POINTS = {
    "opentelemetry.sdk.trace.export.SpanExporter",
    "opentelemetry.sdk.trace.SpanProcessor",
    "opentelemetry.sdk.trace.sampling.Sampler",
    "opentelemetry.sdk.trace.id_generator.IdGenerator",
    "opentelemetry.sdk.metrics.export.MetricExporter",
    "opentelemetry.sdk.metrics.export.MetricReader",
    "opentelemetry.propagators.textmap.TextMapPropagator",
    "opentelemetry.propagators.textmap.Getter",
    "opentelemetry.propagators.textmap.Setter",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library(dotted: str) -> bool:
    return any(dotted == root or dotted.startswith(root + ".") for root in LIBRARIES)


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every use of a library's private name in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    #: Local name -> the dotted library path it is bound to.
    bound: dict[str, str] = {}

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _library(alias.name):
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    report(node, f"imports {alias.name}")
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not _library(node.module):
                continue
            if any(_private(part) for part in node.module.split(".")):
                report(node, f"imports from {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    report(node, f"imports {node.module}.{alias.name}")
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target = _dotted(node.value, bound)
            if target is not None and _library(f"{target}.{node.attr}"):
                report(node, f"reads {target}.{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in BY_NAME
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            report(node, f"{node.func.id} by the private name {node.args[1].value}")
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                target = _dotted(base, bound)
                if target is None or not target.startswith("opentelemetry."):
                    continue
                if target not in EXTENSION_POINTS and not _generated_servicer(target):
                    report(node, f"class {node.name} subclasses {target}")
                    continue
                base_class = _resolve(target)
                for item in node.body:
                    if (
                        isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                        and _private(item.name)
                        and hasattr(base_class, item.name)
                    ):
                        report(item, f"{node.name} overrides the private {target}.{item.name}")
    return found


def _generated_servicer(path: str) -> bool:
    """A gRPC servicer base generated from the OTLP protos (a collector, in the bench)."""
    module, _, name = path.rpartition(".")
    return (
        module.startswith("opentelemetry.proto.")
        and module.endswith("_pb2_grpc")
        and (name.endswith("Servicer"))
    )


def _dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """The library path an expression names (``trace.Span`` -> ...), else None."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value, bound)
        return f"{inner}.{node.attr}" if inner is not None else None
    return None


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _sources() -> list[Path]:
    # Generated stubs are left out: protoc and grpcio-tools write them for the library
    # versions they come with (``make lint`` checks they are fresh), and they are never
    # edited by hand.
    return sorted(
        path
        for folder in CHECKED
        for path in (ROOT / folder).rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def test_no_module_uses_a_private_library_name() -> None:
    sources = _sources()
    assert len(sources) > 50  # the walk found the code it is meant to check
    found = [
        problem
        for path in sources
        for problem in violations(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


@pytest.mark.parametrize(
    ("source", "what"),
    [
        (
            "from opentelemetry.exporter.otlp.proto.common._internal import _encode_resource",
            "imports from opentelemetry.exporter.otlp.proto.common._internal",
        ),
        (
            "from opentelemetry.util._decorator import x",
            "imports from opentelemetry.util._decorator",
        ),
        ("from opentelemetry.trace import _TRACER_PROVIDER", "imports opentelemetry.trace._TRACER"),
        ("import opentelemetry.sdk._logs as logs", "imports opentelemetry.sdk._logs"),
        (
            "from opentelemetry import trace\ntrace._TRACER_PROVIDER = None",
            "reads opentelemetry.trace._TRACER_PROVIDER",
        ),
        (
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "class Fast(TracerProvider):\n    pass",
            "class Fast subclasses opentelemetry.sdk.trace.TracerProvider",
        ),
        (
            "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
            "class Flat(OTLPSpanExporter):\n    pass",
            "subclasses opentelemetry.exporter.otlp.proto.grpc.trace_exporter.OTLPSpanExporter",
        ),
        (
            "from opentelemetry.sdk.trace import export\n"
            "class Sneaky(export.SpanExporter):\n"
            "    def _internal_hook(self): ...\n"
            "    def export(self, spans): ...",
            None,  # a private method of its own is fine: the interface has none of that name
        ),
        (
            "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as g\n"
            "class Collector(g.TraceServiceServicer):\n    pass",
            None,  # generated service bases are made to be implemented
        ),
        ("from sqlalchemy.pool.base import _ConnectionRecord", "imports sqlalchemy.pool.base._"),
        ("import grpc._cython.cygrpc as cygrpc", "imports grpc._cython.cygrpc"),
        ("from google.protobuf.internal import _parameterized", "imports google.protobuf"),
        ("import sqlalchemy\nsqlalchemy.util._collections", "reads sqlalchemy.util._collections"),
        ("import google.protobuf\ngoogle.protobuf._x", "reads google.protobuf._x"),
        ("from redis import asyncio as aioredis\naioredis._x", "reads redis.asyncio._x"),
        ("getattr(pool, '_do_get', None)", "getattr by the private name _do_get"),
        ("setattr(pool, '_do_get', f)", "setattr by the private name _do_get"),
        ("import sqlalchemy\nclass Base(sqlalchemy.orm.DeclarativeBase):\n    pass", None),
        ("import json\njson._default_encoder", None),  # not a library checked here
        ("getattr(cls, '__name__')", None),
        (
            "from opentelemetry.sdk.metrics.export import MetricReader\n"
            "class Reader(MetricReader):\n    def _receive_metrics(self, *a): ...",
            "Reader overrides the private opentelemetry.sdk.metrics.export.MetricReader._receive",
        ),
    ],
)
def test_the_check_catches_private_uses(source: str, what: str | None) -> None:
    found = violations(source)
    if what is None:
        assert found == []
    else:
        assert found
        assert any(what in problem for problem in found), found
