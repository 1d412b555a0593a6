"""Modules over ~300 lines and functions over ~60 in app/, indexer/, models/ (the redesign's limits).

python scripts/check_sizes.py        # prints what is over, and exits 1 if anything is
"""

import ast
import pathlib
import sys

MODULE_LINES, FUNCTION_LINES = 300, 60
over = []
for pkg in ("app", "indexer", "models"):
    for path in sorted(pathlib.Path(pkg).rglob("*.py")):
        source = path.read_text()
        if (n := len(source.splitlines())) > MODULE_LINES:
            over.append(f"module {path}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (n := node.end_lineno - node.lineno + 1) > FUNCTION_LINES:
                over.append(f"function {path}:{node.lineno} {node.name}: {n} lines")
modules = sum(1 for pkg in ("app", "indexer", "models") for _ in pathlib.Path(pkg).rglob("*.py"))
print("\n".join(over) or f"all {modules} modules <= {MODULE_LINES} lines, all functions <= {FUNCTION_LINES} lines")
sys.exit(1 if over else 0)
