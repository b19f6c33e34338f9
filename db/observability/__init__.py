"""Statement observability for the data layer: comments, spans, statistics, slow queries.

Never imports the server: the server feeds the RPC's facts through StatementContext.
"""

from db.observability.context import (
    StatementContext,
    bind_statement_tenant,
    current_statement_context,
    reset_statement_context,
    set_statement_context,
    statement_context,
)
from db.observability.hooks import (
    UNOBSERVED,
    EngineObserver,
    QueryObservers,
    install_statement_observers,
    observer_of,
)
from db.observability.normalize import comment_for, normalize_statement, operation_of
from db.observability.stats import (
    QueryStatistics,
    QueryStatisticsSnapshot,
    SlowQueryDigest,
    SlowQueryEntry,
    SlowQueryOrder,
)

__all__ = [
    "UNOBSERVED",
    "EngineObserver",
    "QueryObservers",
    "QueryStatistics",
    "QueryStatisticsSnapshot",
    "SlowQueryDigest",
    "SlowQueryEntry",
    "SlowQueryOrder",
    "StatementContext",
    "bind_statement_tenant",
    "comment_for",
    "current_statement_context",
    "install_statement_observers",
    "normalize_statement",
    "observer_of",
    "operation_of",
    "reset_statement_context",
    "set_statement_context",
    "statement_context",
]
