"""Allowed values of every enumerated column.

Stored as these upper-case strings (CHECK-constrained VARCHARs); the server maps proto
enums to them by name, so a member's name is its value.
"""

from __future__ import annotations

import enum


class UserRole(enum.StrEnum):
    VIEWER = "VIEWER"
    MEMBER = "MEMBER"
    ADMIN = "ADMIN"
    OWNER = "OWNER"


class UserStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    SUSPENDED = "SUSPENDED"
    PENDING_VERIFICATION = "PENDING_VERIFICATION"


class AuthProvider(enum.StrEnum):
    EMAIL = "EMAIL"
    GOOGLE = "GOOGLE"
    GITHUB = "GITHUB"
    SAML = "SAML"


class AnalysisType(enum.StrEnum):
    SENTIMENT = "SENTIMENT"
    QUALITY = "QUALITY"
    EMOTION = "EMOTION"
    ENTITIES = "ENTITIES"
    KEYWORDS = "KEYWORDS"
    SUMMARY = "SUMMARY"
    LANGUAGE = "LANGUAGE"
    TOXICITY = "TOXICITY"


class OptimizationTier(enum.StrEnum):
    STANDARD = "STANDARD"
    FAST = "FAST"
    ACCURATE = "ACCURATE"


class AnalysisState(enum.StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    def can_become(self, target: AnalysisState) -> bool:
        """Whether the state machine allows ``self -> target``."""
        return target in ANALYSIS_TRANSITIONS[self]


#: PENDING -> PROCESSING | FAILED, PROCESSING -> COMPLETED | FAILED; the rest are final.
ANALYSIS_TRANSITIONS: dict[AnalysisState, frozenset[AnalysisState]] = {
    AnalysisState.PENDING: frozenset({AnalysisState.PROCESSING, AnalysisState.FAILED}),
    AnalysisState.PROCESSING: frozenset({AnalysisState.COMPLETED, AnalysisState.FAILED}),
    AnalysisState.COMPLETED: frozenset(),
    AnalysisState.FAILED: frozenset(),
}


class RiskLevel(enum.StrEnum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
