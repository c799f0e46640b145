"""The layout keeps its promises: every module sits in a layer of the import contract, modules
stay small and single-topic, and file names do not repeat their folder's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fgscope

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI runs 3.11

ROOT = Path(fgscope.__file__).parent
MAX_LINES = 420  # "roughly 100-400 lines" (shared/STYLE.md); a few lines of slack, no more


def _layers() -> list[str]:
    config = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [m.strip() for layer in contract["layers"] for m in re.split(r"[|:]", layer)]


def test_every_module_is_in_a_layer():
    listed = set(_layers())
    top = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(f"fgscope.{m}" for m in top if f"fgscope.{m}" not in listed)
    assert not missing, f"add these to [tool.importlinter] layers in pyproject.toml: {missing}"


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these modules by topic: {big}"


def test_no_file_name_repeats_its_folder():
    bad = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
           if p.parent != ROOT and p.stem.startswith(p.parent.name + "_")]
    assert not bad, bad
