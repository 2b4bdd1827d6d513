"""The size rule `scripts/check` enforces (scripts/sizes.py): it finds a function past 80
lines and a module past 450 (so the check can fail), and the product's code has none."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _sizes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sizes", ROOT / "scripts" / "sizes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sizes"] = module
    spec.loader.exec_module(module)
    return module


def test_a_long_function_and_a_long_module_are_found(tmp_path: Path) -> None:
    sizes = _sizes()
    body = "".join(f"    x{i} = {i}\n" for i in range(sizes.FUNCTION_LINES))
    (tmp_path / "long_function.py").write_text(f"def f() -> None:\n{body}")
    (tmp_path / "long_module.py").write_text("x = 1\n" * (sizes.MODULE_LINES + 1))
    (tmp_path / "fine.py").write_text("def g() -> int:\n    return 1\n")
    found = sizes.breaches(tmp_path)
    assert len(found) == 2, found
    assert any("long_function.py" in b and " f is " in b for b in found), found
    assert any("long_module.py" in b for b in found), found


def test_the_product_keeps_the_rule() -> None:
    sizes = _sizes()
    found = [b for root in sizes.ROOTS for b in sizes.breaches(ROOT / root)]
    assert not found, "\n".join(found)
