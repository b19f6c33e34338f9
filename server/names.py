"""Resource names (AIP-122): parsed and validated in one place.

A name is checked before anything else, and the organization it names is authorized
before any lookup (server/tenancy.py), so a malformed or foreign name never reaches SQL.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass

from db.errors import FieldViolation, ValidationError

_SEGMENT = r"([^/]+)"
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")


@dataclass(frozen=True)
class Pattern:
    """A name template such as `organizations/{organization}/users/{user}`."""

    template: str
    resource_type: str
    #: The template with each placeholder as ``%s`` (any literal ``%`` doubled), made
    #: once: every response names its resource, and ``%`` on the ids' tuple is the
    #: cheapest generic fill (no format-string parse per call, no lookup of the string).
    #: Each id becomes ``str(id)``, exactly as under ``str.format``.
    _printf: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_printf", _PLACEHOLDER.sub("%s", self.template.replace("%", "%%"))
        )

    @property
    def regex(self) -> re.Pattern[str]:
        return _compiled(self.template)

    def format(self, *ids: uuid.UUID | str) -> str:
        return self._printf % ids

    def parse(self, name: str, field: str = "name") -> tuple[uuid.UUID, ...]:
        """Every id in the name as a UUID, or INVALID_ARGUMENT naming the field.

        Names that parsed are remembered (a bounded table, emptied when full): every
        request names its resource and hot resources are named again and again, and a
        name's ids never change; names that fail are never remembered."""
        key = (self.template, name)
        parsed = _parsed.get(key)
        if parsed is None:
            parsed = self._parse(name, field)
            if len(_parsed) >= _PARSED_MAX:
                _parsed.clear()
            _parsed[key] = parsed
        return parsed

    def _parse(self, name: str, field: str) -> tuple[uuid.UUID, ...]:
        if not name:
            raise _invalid(field, f"required; expected {self.template}")
        match = self.regex.fullmatch(name)
        if match is None:
            raise _invalid(field, f"{name[:200]!r} does not match {self.template}")
        ids = []
        for value in match.groups():
            try:
                ids.append(uuid.UUID(value))
            except ValueError:
                raise _invalid(field, f"{value[:100]!r} in {field} is not a UUID") from None
        return tuple(ids)


_cache: dict[str, re.Pattern[str]] = {}
#: Names already parsed, by (template, name); at most _PARSED_MAX of them.
_parsed: dict[tuple[str, str], tuple[uuid.UUID, ...]] = {}
_PARSED_MAX = 4096


def _compiled(template: str) -> re.Pattern[str]:
    regex = _cache.get(template)
    if regex is None:
        regex = re.compile(re.sub(r"\{[a-z_]+\}", _SEGMENT, template))
        _cache[template] = regex
    return regex


def _invalid(field: str, description: str) -> ValidationError:
    return ValidationError(violations=[FieldViolation(field, description)])


ORGANIZATION = Pattern("organizations/{organization}", "ferrule.v1.Organization")
USER = Pattern("organizations/{organization}/users/{user}", "ferrule.v1.User")
USER_SESSION = Pattern(
    "organizations/{organization}/users/{user}/sessions/{session}", "ferrule.v1.UserSession"
)
ANALYSIS = Pattern("organizations/{organization}/analyses/{analysis}", "ferrule.v1.Analysis")
BATCH = Pattern("organizations/{organization}/batches/{batch}", "ferrule.v1.AnalysisBatch")
MODEL_PERFORMANCE = Pattern(
    "organizations/{organization}/modelPerformances/{record}", "ferrule.v1.ModelPerformance"
)
PREDICTION = Pattern(
    "organizations/{organization}/predictions/{prediction}", "ferrule.v1.Prediction"
)
REQUEST_LOG = Pattern("organizations/{organization}/requestLogs/{entry}", "ferrule.v1.RequestLog")


def parse_resource_id(value: str, field: str) -> uuid.UUID:
    """A client-chosen id (the `x_id` of a Create): must be a UUID."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise _invalid(field, f"{value[:100]!r} is not a UUID") from None
