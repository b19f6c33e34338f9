"""Authorization: which scope each RPC needs, and whether a caller may touch an organization.

The scope comes from the RPC's verb (reads need `read`, everything else `write`) with an
explicit list of admin-only RPCs; a test walks every RPC of the contract against this table.
"""

from __future__ import annotations

from server.auth import Principal


class PermissionDeniedError(Exception):
    """The caller is authenticated but may not do this (PERMISSION_DENIED)."""

    def __init__(self, message: str, reason: str = "PERMISSION_DENIED") -> None:
        super().__init__(message)
        self.reason = reason


#: RPCs that answer without credentials (standard health checking and reflection).
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

ADMIN_METHODS = frozenset(
    {
        "/ferrule.v1.UserService/CreateOrganization",
        "/ferrule.v1.UserService/ListOrganizations",
        "/ferrule.v1.UserService/DeleteOrganization",
        "/ferrule.v1.UserService/UndeleteOrganization",
        "/ferrule.v1.PredictionService/PurgePredictions",
        "/ferrule.v1.PredictionService/ListRequestLogs",
        "/ferrule.v1.HealthService/GetSlowQueryReport",
        "/ferrule.v1.HealthService/ResetSlowQueryReport",
    }
)

READ_VERBS = ("Get", "List", "Lookup", "Search", "Export")


def service_of(method: str) -> str:
    return method.lstrip("/").split("/", 1)[0]


def is_public(method: str) -> bool:
    return service_of(method) in PUBLIC_SERVICES


def required_scope(method: str) -> str:
    if method in ADMIN_METHODS:
        return "admin"
    verb = method.rsplit("/", 1)[-1]
    return "read" if verb.startswith(READ_VERBS) else "write"


def check_scope(principal: Principal, method: str) -> None:
    scope = required_scope(method)
    # write implies read, admin implies both.
    granted = set(principal.scopes)
    if "admin" in granted:
        granted |= {"read", "write"}
    if "write" in granted:
        granted.add("read")
    if scope not in granted:
        raise PermissionDeniedError(
            f"{method.rsplit('/', 1)[-1]} needs the '{scope}' scope", reason="MISSING_SCOPE"
        )


def check_organization(principal: Principal, organization_id: str) -> None:
    """Refuse before any lookup, so nobody can probe another tenant's names."""
    if principal.all_organizations or principal.organization == organization_id:
        return
    raise PermissionDeniedError(
        "the caller's token does not grant access to this organization",
        reason="ORGANIZATION_MISMATCH",
    )
