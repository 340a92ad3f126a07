"""The library's shape, kept in check: no function takes more than MAX_PARAMETERS parameters (settings
travel as objects: ``CompressConfig``, ``EvalConfig``). Typer's command functions are exempt: each flag is
a parameter there. ``python -m tests.test_code_shape`` prints the longest and the widest functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compress_eval"
MAX_PARAMETERS = 8


def functions():
    """(where, node) of every function of the package, methods included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{module}:{node.name}", node


def parameters(node) -> int:
    """Named parameters, counting neither self/cls nor *args/**kwargs."""
    args = node.args
    named = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len([a for a in named if a not in ("self", "cls")])


def is_command(node) -> bool:
    """A Typer command: the CLI wraps each in ``user_errors``."""
    return any(isinstance(d, ast.Name) and d.id == "user_errors" for d in node.decorator_list)


def widest(n: int) -> list[tuple[int, str]]:
    return sorted(((parameters(node), where) for where, node in functions() if not is_command(node)),
                  reverse=True)[:n]


def longest(n: int) -> list[tuple[int, str]]:
    return sorted(((node.end_lineno - node.lineno + 1, where) for where, node in functions()), reverse=True)[:n]


def test_no_library_function_takes_more_than_eight_parameters():
    wide = sorted(where for count, where in widest(1000) if count > MAX_PARAMETERS)
    assert not wide, f"over {MAX_PARAMETERS} parameters, pass a config object: {wide}"


if __name__ == "__main__":
    print("longest functions (lines):")
    for count, where in longest(10):
        print(f"  {count:4d}  {where}")
    print("widest functions (parameters, Typer commands exempt):")
    for count, where in widest(5):
        print(f"  {count:4d}  {where}")
