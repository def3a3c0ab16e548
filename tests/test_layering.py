"""The architecture holds: import-linter contracts (.importlinter) and no private name used across modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "circuitlab"


def test_import_contracts_are_kept():
    """Layers (docs/guide/architecture.md), experiments independent of each other, no import cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: install the test extras (pip install -e '.[test]', import-linter)")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(path: Path) -> list[str]:
    """``from circuitlab.x import _y`` and ``module._y`` where ``module`` was imported from circuitlab."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("circuitlab")):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            imported |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("circuitlab")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in imported):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_private_names_stay_in_their_module():
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(path)]
    assert not found, "private names used outside their module (make them public or move the code):\n" + \
        "\n".join(found)


def test_private_name_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..interventions import _orig\nfrom .. import weights as w\nw._check_unit(1, 2)\n")
    assert len(_private_uses(bad)) == 2
