"""Size rules of CONTRIBUTING.md: no module in vpo_ray/ over 600 lines, no function over 80;
and a file named tests/**/test_*.py holds tests (helpers are named for what they are).

`python tests/test_code_size.py [N]` prints the N largest modules and functions.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "vpo_ray"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_sizes() -> list[tuple[int, str]]:
    """(lines, path) of every module of the package, largest first."""
    return sorted(((len(p.read_text().splitlines()), str(p.relative_to(PACKAGE.parent)))
                   for p in PACKAGE.rglob("*.py")), reverse=True)


def function_sizes() -> list[tuple[int, str]]:
    """(lines from `def` to its last line, path:line name) of every function and method, largest first."""
    sizes = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1,
                              f"{p.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"))
    return sorted(sizes, reverse=True)


def test_no_module_over_600_lines():
    over = [f"{n} {path}" for n, path in module_sizes() if n > MAX_MODULE_LINES]
    assert not over, "modules over 600 lines (split them by job):\n" + "\n".join(over)


def test_no_function_over_80_lines():
    over = [f"{n} {where}" for n, where in function_sizes() if n > MAX_FUNCTION_LINES]
    assert not over, "functions over 80 lines:\n" + "\n".join(over)



def test_modules_named_test_hold_tests():
    """pytest collects every test_*.py as a test file; a helper module is named for what it holds (train_helpers.py)."""
    def has_tests(p: Path) -> bool:
        return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")
                   for n in ast.walk(ast.parse(p.read_text(), str(p))))
    empty = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py") if not has_tests(p)]
    assert not empty, f"modules named test_* without a test (rename them): {empty}"


if __name__ == "__main__":
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    print("largest modules (lines):")
    for n, path in module_sizes()[:top]:
        print(f"  {n:5d}  {path}")
    print("largest functions (lines):")
    for n, where in function_sizes()[:top]:
        print(f"  {n:5d}  {where}")
