"""The house rules of the code: the import layers of pyproject.toml hold, and imports sit at module level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "coembed", ROOT / "modalities"]


def test_the_import_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _function_level_imports(path: Path) -> list[str]:
    """``module:line name`` of every import of a coembed module inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = ([alias.name for alias in inner.names] if isinstance(inner, ast.Import)
                         else [inner.module or ""] if isinstance(inner, ast.ImportFrom) and inner.level == 0
                         else ["."] if isinstance(inner, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)}:{inner.lineno} {n}" for n in names
                          if n == "." or n.split(".")[0] in {"coembed", "coembed_modalities"}]
    return found


def test_coembed_modules_are_imported_at_module_level_only() -> None:
    """A function-level import of coembed hides a dependency from the layer contract's reader, or dodges a cycle."""
    found = [hit for package in PACKAGES for path in sorted(package.rglob("*.py")) for hit in _function_level_imports(path)]
    assert found == []
