"""Every table Ferrule owns. Importing this package registers them all on ``Base.metadata``."""

from db.models.analyses import AnalysisBatch, ModelPerformanceRecord, TextAnalysis
from db.models.base import Base, new_id, utcnow
from db.models.enums import (
    ANALYSIS_TRANSITIONS,
    AnalysisState,
    AnalysisType,
    AuthProvider,
    OptimizationTier,
    RiskLevel,
    UserRole,
    UserStatus,
)
from db.models.idempotency import IdempotencyKey, IngestBatch
from db.models.predictions import Prediction
from db.models.request_log import RequestLogEntry
from db.models.users import Organization, User, UserProfile, UserSession

#: Tables whose rows belong to one organization (RLS policies key off ``organization_id``).
TENANT_TABLES: tuple[str, ...] = (
    "users",
    "user_profiles",
    "user_sessions",
    "analysis_batches",
    "text_analyses",
    "model_performance_records",
    "predictions",
    "ingest_batches",
    "idempotency_keys",
    "request_log",
)

__all__ = [
    "ANALYSIS_TRANSITIONS",
    "TENANT_TABLES",
    "AnalysisBatch",
    "AnalysisState",
    "AnalysisType",
    "AuthProvider",
    "Base",
    "IdempotencyKey",
    "IngestBatch",
    "ModelPerformanceRecord",
    "OptimizationTier",
    "Organization",
    "Prediction",
    "RequestLogEntry",
    "RiskLevel",
    "TextAnalysis",
    "User",
    "UserProfile",
    "UserRole",
    "UserSession",
    "UserStatus",
    "new_id",
    "utcnow",
]
