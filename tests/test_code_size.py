"""How we write code: no function in bfly/ or launch/ over 60 lines, no class over 200. A longer one is
split by concern (a long function does several things; a long class has several jobs)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION = 60
MAX_CLASS = 200


def lines_of(node: ast.AST) -> int:
    """Lines from the first decorator to the end, the docstring included."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return (node.end_lineno or node.lineno) - first + 1


def oversized(path: Path, root: Path = REPO) -> list[str]:
    """`path:line name (N lines)` for each function over MAX_FUNCTION and class over MAX_CLASS lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = MAX_FUNCTION
        elif isinstance(node, ast.ClassDef):
            limit = MAX_CLASS
        else:
            continue
        if (n := lines_of(node)) > limit:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def offenders(paths: list[Path]) -> list[str]:
    return [line for path in sorted(paths) for line in oversized(path)]


OURS = sorted([*REPO.glob("bfly/**/*.py"), *REPO.glob("launch/**/*.py")])


def test_no_function_is_over_60_lines_and_no_class_over_200():
    assert offenders(OURS) == []


def test_an_oversized_function_and_class_are_named(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    methods = "\n".join(f"    def m{i}(self):\n        pass\n" for i in range(MAX_CLASS // 3 + 1))  # 3 lines each
    (tmp_path / "example.py").write_text(f"def long():\n{body}\n\n\nclass Big:\n{methods}\n\nclass Small:\n    pass\n")
    assert oversized(tmp_path / "example.py", tmp_path) == [
        f"example.py:1 long ({MAX_FUNCTION + 1} lines)",
        f"example.py:{MAX_FUNCTION + 4} Big ({(MAX_CLASS // 3 + 1) * 3} lines)",
    ]
