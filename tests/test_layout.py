"""The README's project layout names every module, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "indexer", "models")


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Project layout") :]
    return section.split("```")[1]


def test_the_readme_layout_names_every_module_and_no_other() -> None:
    named = set(re.findall(r"\b([a-z_0-9]+\.py)\b", _layout_block()))
    modules = [
        p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
    ]
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if p.name not in named)
    assert not missing, f"add to the README's project layout: {missing}"
    existing = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    assert not sorted(named - existing), (
        f"the README's layout names modules that do not exist: {sorted(named - existing)}"
    )
