"""The README and docs/ promise things by name: settings and the tests that prove a
guarantee. These tests keep the names honest, so the manual cannot drift from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bench.registry import discover
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `server/test_x.py` or `tests/server/test_x.py::test_y[param]`, as the docs write them.
TEST_REFERENCE = re.compile(
    r"(?:tests/)?((?:client|db|server|deploy)/test_\w+\.py)(?:::(test_\w+)(?:\[[^\]`]*\])?)?"
)
# Ferrule's own environment variables, wherever they are written.
SETTING_NAME = re.compile(r"\b((?:FERRULE|DATABASE|REDIS)_[A-Z0-9_]*[A-Z0-9])\b")
# Variables standard to a library rather than Ferrule's own (`OTEL_*`).
NOT_FERRULE_SETTINGS = {"OTEL_*"}


def readme_settings_table() -> set[str]:
    """Every variable named in the first column of the README's configuration table."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z0-9_*]+)`", line.split("|")[1]))
    return names


def test_the_readme_settings_table_names_every_setting_and_no_other() -> None:
    documented = readme_settings_table() - NOT_FERRULE_SETTINGS
    settings = {name.upper() for name in Settings.model_fields}
    assert sorted(settings - documented) == [], "settings missing from the README table"
    assert sorted(documented - settings) == [], "README names settings that do not exist"


def test_every_setting_the_manual_and_deployment_files_name_exists() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    deployment = [ROOT / "compose.yaml", *sorted((ROOT / "deploy").rglob("*.yaml"))]
    unknown = {
        f"{page.relative_to(ROOT)}: {name}"
        for page in [*MANUAL, ROOT / "client" / "README.md", *deployment]
        for name in SETTING_NAME.findall(page.read_text())
        if name not in settings
    }
    assert sorted(unknown) == []


def test_the_readme_describes_every_bench_scenario() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    described = set(re.findall(r"^- `(\w+)`", section, re.MULTILINE))
    assert described == set(discover())


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_manual_names_exists() -> None:
    references = [
        (page.name, match.group(1), match.group(2))
        for page in MANUAL
        for match in TEST_REFERENCE.finditer(page.read_text())
    ]
    assert len(references) > 50  # the pattern still matches how the docs cite tests
    missing = []
    for page, file, test in references:
        path = ROOT / "tests" / file
        if not path.is_file() or (test is not None and test not in defined_tests(path)):
            missing.append(f"{page}: {file}" + (f"::{test}" if test else ""))
    assert missing == []
