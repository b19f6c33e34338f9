"""Servicers: translate protobuf <-> domain calls; no SQL here (that is db/'s job)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from server.app import Dependencies

#: Each module exposes `add_to_server(server, deps) -> str` (the full service name).
SERVICE_MODULES = (
    "server.services.user_service",
    "server.services.analysis_service",
    "server.services.prediction_service",
    "server.services.health_service",
)


def register_services(server: grpc.aio.Server, deps: Dependencies) -> list[str]:
    names = []
    for module_name in SERVICE_MODULES:
        module = importlib.import_module(module_name)
        names.append(module.add_to_server(server, deps))
    return names
