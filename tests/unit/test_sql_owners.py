"""Each `_repl_*` table's SQL lives in its owners, as ARCHITECTURE.md's table says.

Every module of `replicator/` is parsed (nothing is run) and every string literal is searched
for `_repl_*` names, f-string parts included; docstrings and other bare string statements are
prose, and comments are not in the tree at all, so both may mention any table. A table or index
named outside the table's owners or the DDL module fails the test with
the module and the table.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.capture.migrations import MIGRATIONS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "replicator"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
SECTION = "## Who owns which `_repl_*` table"

# Creates and alters every table: naming all of them is its job.
DDL_MODULES = frozenset({"capture/migrations"})
# `_repl_` names that are no table of ours.
NOT_TABLES = {
    "_repl_capture_": "the capture triggers' name prefix (capture/tables)",
    "_repl_expiry": "a scope of the state store's own table (state/schema)",
}
_NAME = re.compile(r"_repl_[a-z_]+")
_CREATE_TABLE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(_repl_[a-z_]+)")
_CREATE_INDEX = re.compile(r"CREATE INDEX (_repl_[a-z_]+) ON (_repl_[a-z_]+)")
_CELL = re.compile(r"`([^`]+)`")


def owners_from_architecture(text: str) -> dict[str, frozenset[str]]:
    """Table -> owner modules, from the ownership section's markdown table."""
    if SECTION not in text:
        raise AssertionError(f"ARCHITECTURE.md has no section {SECTION!r}")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    owners: dict[str, frozenset[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`_repl_"):
            continue
        (table,) = _CELL.findall(cells[0])
        owners[table] = frozenset(_CELL.findall(cells[1]))
    return owners


def schema_names() -> tuple[set[str], dict[str, str]]:
    """Tables the migrations create (and `_repl_migrations`), and index -> its table."""
    scripts = [script for _, _, script in MIGRATIONS]
    tables = {"_repl_migrations"} | {name for s in scripts for name in _CREATE_TABLE.findall(s)}
    indexes = {index: table for s in scripts for index, table in _CREATE_INDEX.findall(s)}
    return tables, indexes


def module_of(path: Path) -> str:
    """`capture/store` for replicator/capture/store.py, `node` for replicator/node.py."""
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def names_in_literals(source: str) -> Iterator[tuple[int, str]]:
    """(line, `_repl_*` name) for every string literal that is not a bare string statement."""
    tree = ast.parse(source)
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            for name in _NAME.findall(node.value):
                yield node.lineno, name


def strays(
    modules: dict[str, str], owners: dict[str, frozenset[str]], indexes: dict[str, str]
) -> list[str]:
    """One line per `_repl_*` name a module's literals hold without owning it."""
    found = []
    for module, source in sorted(modules.items()):
        for line, name in names_in_literals(source):
            if name in NOT_TABLES:
                continue
            table = indexes.get(name, name)
            if table not in owners:
                found.append(f"{module}:{line}: {name} is no known `_repl_*` table")
            elif not (module in owners[table] or module in DDL_MODULES):
                mine = ", ".join(sorted(owners[table]))
                found.append(f"{module}:{line}: names {table}, owned by {mine}")
    return found


def replicator_modules() -> dict[str, str]:
    return {module_of(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_repl_table_has_owners_in_architecture() -> None:
    owners = owners_from_architecture(ARCHITECTURE.read_text())
    tables, _ = schema_names()
    assert sorted(tables - owners.keys()) == [], "give these tables owners in ARCHITECTURE.md"
    assert sorted(owners.keys() - tables) == [], "ARCHITECTURE.md lists tables that do not exist"
    modules = replicator_modules()
    assert sorted({m for ms in owners.values() for m in ms} - modules.keys()) == []


def test_repl_tables_are_named_only_by_their_owners() -> None:
    owners = owners_from_architecture(ARCHITECTURE.read_text())
    _, indexes = schema_names()
    assert strays(replicator_modules(), owners, indexes) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('conn.execute("SELECT hlc FROM _repl_clock WHERE id = 1")\n', ["names _repl_clock"]),
        ('f"DELETE FROM _repl_probe WHERE id = {n}"\n', ["names _repl_probe"]),
        (
            "sql = \"SELECT 1 FROM sqlite_schema WHERE name = '_repl_conflicts_status'\"\n",
            ["names _repl_conflicts"],
        ),
        ('sql = "SELECT * FROM _repl_nothing"\n', ["_repl_nothing is no known"]),
        ('"""Reads `_repl_clock`, in prose."""\n# and _repl_clock in a comment\n', []),
    ],
)
def test_a_stray_table_name_is_caught(source: str, expected: list[str]) -> None:
    owners = owners_from_architecture(ARCHITECTURE.read_text())
    _, indexes = schema_names()
    found = strays({"ops/somewhere": source}, owners, indexes)
    assert len(found) == len(expected)
    for line, wanted in zip(found, expected, strict=True):
        assert line.startswith("ops/somewhere:1: ")
        assert wanted in line
