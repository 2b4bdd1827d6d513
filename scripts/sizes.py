"""The size rule `scripts/check` enforces on the product's code (ingest, workers, refstream,
bench): no function past 80 lines, no module past 450. No list of exceptions: a function
that grows past it is split into named steps, a module into cohesive siblings.

    python scripts/sizes.py [DIR ...]   # exit 1, and one line per breach, when any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FUNCTION_LINES = 80
MODULE_LINES = 450
ROOTS = ("ingest", "workers", "refstream", "bench")


def breaches(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if (n := text.count("\n")) > MODULE_LINES:
            out.append(f"{path}: {n} lines (most: {MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES:
                    out.append(f"{path}:{node.lineno}: {node.name} is {length} lines (most: {FUNCTION_LINES})")
    return out


def main(argv: list[str]) -> int:
    found = [b for root in (argv or ROOTS) for b in breaches(Path(root))]
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
