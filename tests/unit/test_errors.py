"""The error tree drawn in fhir_bridge/errors.py is the real one: every class, its parent and its issue type."""

from __future__ import annotations

import inspect
import re

from fhir_bridge import errors

_LINE = re.compile(r'^(?P<indent>(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Z]\w+)\s+(?:issue type )?"(?P<type>[\w-]+)"')


def drawn_tree() -> dict[str, tuple[str | None, str]]:
    """{class name: (parent name, issue type)} from the module docstring's drawing."""
    doc = errors.__doc__ or ""
    lines = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    tree: dict[str, tuple[str | None, str]] = {}
    parents: list[str] = []
    for line in lines:
        match = _LINE.match(line.removeprefix("    "))
        assert match, f"not a line of the tree: {line!r}"
        depth = len(match["indent"]) // 4 + (0 if match["name"] == "BridgeError" else 1)
        parents[depth:] = [match["name"]]
        tree[match["name"]] = (parents[depth - 1] if depth else None, match["type"])
    return tree


def real_tree() -> dict[str, tuple[str | None, str]]:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.BridgeError) and c.__module__ == errors.__name__]
    return {c.__name__: (None if c is errors.BridgeError else c.__bases__[0].__name__, c.issue_type) for c in classes}


def test_the_drawn_error_tree_is_the_real_one() -> None:
    assert drawn_tree() == real_tree()
