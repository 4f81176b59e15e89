"""The layout keeps its promises (README "Layout"): a few top-level modules, small modules everywhere.

The import contracts themselves (layers, no framework in the core, no circles) are import-linter's, run by
``bash dev.sh test`` (``lint-imports``, pyproject.toml ``[tool.importlinter]``).
"""

from __future__ import annotations

from pathlib import Path

import fhir_bridge

PACKAGE = Path(fhir_bridge.__file__).parent
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 10


def test_the_package_root_holds_at_most_ten_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_module_passes_four_hundred_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"
