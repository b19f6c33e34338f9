"""Servicers: translate protobuf <-> domain calls; no SQL here (that is db/'s job)."""

from __future__ import annotations

import grpc

from server.dependencies import Dependencies
from server.services import analysis_service, health_service, prediction_service, user_service

#: Each exposes `add_to_server(server, deps) -> str` (the full service name).
SERVICE_MODULES = (user_service, analysis_service, prediction_service, health_service)


def register_services(server: grpc.aio.Server, deps: Dependencies) -> list[str]:
    return [module.add_to_server(server, deps) for module in SERVICE_MODULES]
