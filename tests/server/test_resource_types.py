"""ResourceInfo.resource_type has one spelling: the full name of the resource's message
(AIP-193), whichever layer raises the error."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import descriptor_pool

import db.repositories
import ferrule.v1
from db.error_translation import INTERNAL_RECORDS, RESOURCE_TYPES
from db.repositories.base import Repository
from server import names


def _load_all(package: ModuleType) -> None:
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)


def _subclasses(cls: type) -> set[type]:
    found: set[type] = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


_load_all(ferrule.v1)
_load_all(db.repositories)
REPOSITORIES = sorted(_subclasses(Repository), key=lambda c: c.__qualname__)
PATTERNS = {name: value for name, value in vars(names).items() if isinstance(value, names.Pattern)}


def _is_message(full_name: str) -> bool:
    try:
        descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("repository", REPOSITORIES, ids=lambda c: c.__qualname__)
def test_repositories_name_their_resource_by_its_message(repository: type[Repository[Any]]) -> None:
    assert _is_message(repository.resource_type), repository.resource_type


@pytest.mark.parametrize("pattern", sorted(PATTERNS), ids=str)
def test_resource_name_patterns_name_their_resource_by_its_message(pattern: str) -> None:
    assert _is_message(PATTERNS[pattern].resource_type), PATTERNS[pattern].resource_type


@pytest.mark.parametrize("table", sorted(RESOURCE_TYPES), ids=str)
def test_constraint_errors_name_their_resource_by_its_message(table: str) -> None:
    resource_type = RESOURCE_TYPES[table]
    assert _is_message(resource_type) or resource_type in INTERNAL_RECORDS, resource_type


def test_internal_records_are_not_messages() -> None:
    assert not any(_is_message(name) for name in INTERNAL_RECORDS)


def test_the_check_can_fail() -> None:
    assert REPOSITORIES and PATTERNS
    assert not _is_message("User")
