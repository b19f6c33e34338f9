"""Authorization: the one table of what each RPC needs, and organization checks.

Default deny: an RPC that is not in :data:`RPC_ACCESS` is refused before anything else
runs, whatever the caller's credentials, so a new RPC is unreachable until someone
decides its access here. ``tests/server/test_authorization_table.py`` walks every
service the server registers and fails when an RPC has no entry (or an entry names an
RPC that does not exist).
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType

from server.auth import Principal


class PermissionDeniedError(Exception):
    """The caller is authenticated but may not do this (PERMISSION_DENIED)."""

    def __init__(self, message: str, reason: str = "PERMISSION_DENIED") -> None:
        super().__init__(message)
        self.reason = reason


class Access(StrEnum):
    """What a caller needs for an RPC. ``write`` implies ``read``; ``admin`` implies both."""

    #: No credentials: the standard health service and reflection, and nothing else.
    ANONYMOUS = "anonymous"
    READ = "read"
    WRITE = "write"
    #: Admin scope: cross-tenant operations and process-level reports.
    ADMIN = "admin"


_A, _R, _W, _ADMIN = Access.ANONYMOUS, Access.READ, Access.WRITE, Access.ADMIN

#: Full method name (as gRPC sees it) -> the access it needs. Keep it sorted by service.
RPC_ACCESS: MappingProxyType[str, Access] = MappingProxyType(
    {
        # Standard services, answered without credentials (their streams have their own
        # small capacity: server/interceptors/capacity.py).
        "/grpc.health.v1.Health/Check": _A,
        "/grpc.health.v1.Health/List": _A,
        "/grpc.health.v1.Health/Watch": _A,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _A,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _A,
        # UserService
        "/ferrule.v1.UserService/CreateOrganization": _ADMIN,
        "/ferrule.v1.UserService/GetOrganization": _R,
        "/ferrule.v1.UserService/ListOrganizations": _ADMIN,
        "/ferrule.v1.UserService/UpdateOrganization": _W,
        "/ferrule.v1.UserService/DeleteOrganization": _ADMIN,
        "/ferrule.v1.UserService/UndeleteOrganization": _ADMIN,
        "/ferrule.v1.UserService/CreateUser": _W,
        "/ferrule.v1.UserService/GetUser": _R,
        "/ferrule.v1.UserService/ListUsers": _R,
        "/ferrule.v1.UserService/UpdateUser": _W,
        "/ferrule.v1.UserService/DeleteUser": _W,
        "/ferrule.v1.UserService/UndeleteUser": _W,
        "/ferrule.v1.UserService/SetUserPassword": _W,
        "/ferrule.v1.UserService/LookupUserByEmail": _R,
        "/ferrule.v1.UserService/SearchUsers": _R,
        # Records the last login: a write.
        "/ferrule.v1.UserService/VerifyPassword": _W,
        "/ferrule.v1.UserService/GetUserStatistics": _R,
        "/ferrule.v1.UserService/CreateUserSession": _W,
        "/ferrule.v1.UserService/GetUserSession": _R,
        "/ferrule.v1.UserService/ListUserSessions": _R,
        "/ferrule.v1.UserService/RevokeUserSession": _W,
        # AnalysisService
        "/ferrule.v1.AnalysisService/CreateAnalysis": _W,
        "/ferrule.v1.AnalysisService/GetAnalysis": _R,
        "/ferrule.v1.AnalysisService/ListAnalyses": _R,
        "/ferrule.v1.AnalysisService/SearchAnalyses": _R,
        "/ferrule.v1.AnalysisService/UpdateAnalysis": _W,
        "/ferrule.v1.AnalysisService/DeleteAnalysis": _W,
        "/ferrule.v1.AnalysisService/UndeleteAnalysis": _W,
        "/ferrule.v1.AnalysisService/BatchCreateAnalyses": _W,
        "/ferrule.v1.AnalysisService/CreateBatch": _W,
        "/ferrule.v1.AnalysisService/GetBatch": _R,
        "/ferrule.v1.AnalysisService/ListBatches": _R,
        "/ferrule.v1.AnalysisService/UpdateBatch": _W,
        "/ferrule.v1.AnalysisService/DeleteBatch": _W,
        "/ferrule.v1.AnalysisService/UndeleteBatch": _W,
        "/ferrule.v1.AnalysisService/CreateModelPerformance": _W,
        "/ferrule.v1.AnalysisService/ListModelPerformances": _R,
        "/ferrule.v1.AnalysisService/GetAnalysisStatistics": _R,
        "/ferrule.v1.AnalysisService/WatchAnalysis": _R,
        "/ferrule.v1.AnalysisService/WatchBatch": _R,
        # PredictionService
        "/ferrule.v1.PredictionService/CreatePrediction": _W,
        "/ferrule.v1.PredictionService/BatchCreatePredictions": _W,
        "/ferrule.v1.PredictionService/StreamPredictions": _W,
        "/ferrule.v1.PredictionService/GetPrediction": _R,
        "/ferrule.v1.PredictionService/ListPredictions": _R,
        "/ferrule.v1.PredictionService/ExportPredictions": _R,
        "/ferrule.v1.PredictionService/WatchPredictions": _R,
        "/ferrule.v1.PredictionService/GetRiskDistribution": _R,
        "/ferrule.v1.PredictionService/GetPredictionStatistics": _R,
        "/ferrule.v1.PredictionService/PurgePredictions": _ADMIN,
        "/ferrule.v1.PredictionService/ListRequestLogs": _ADMIN,
        # HealthService: process-level figures (server version, pid, statistics over
        # every tenant's queries) are for operators, not tenants.
        "/ferrule.v1.HealthService/GetHealthReport": _ADMIN,
        "/ferrule.v1.HealthService/GetSlowQueryReport": _ADMIN,
        "/ferrule.v1.HealthService/ResetSlowQueryReport": _ADMIN,
    }
)


def access_of(method: str, table: MappingProxyType[str, Access] = RPC_ACCESS) -> Access:
    """What ``method`` needs; PermissionDeniedError when the table has no entry for it."""
    access = table.get(method)
    if access is None:
        raise PermissionDeniedError(
            f"{method} has no entry in the server's authorization table: refused by default",
            reason="RPC_NOT_AUTHORIZED",
        )
    return access


def check_scope(principal: Principal, access: Access, method: str) -> None:
    # write implies read, admin implies both.
    granted = set(principal.scopes)
    if "admin" in granted:
        granted |= {"read", "write"}
    if "write" in granted:
        granted.add("read")
    if access not in granted:
        raise PermissionDeniedError(
            f"{method.rsplit('/', 1)[-1]} needs the '{access}' scope", reason="MISSING_SCOPE"
        )


def check_organization(principal: Principal, organization_id: str) -> None:
    """Refuse before any lookup, so nobody can probe another tenant's names."""
    if principal.all_organizations or principal.organization == organization_id:
        return
    raise PermissionDeniedError(
        "the caller's token does not grant access to this organization",
        reason="ORGANIZATION_MISMATCH",
    )
