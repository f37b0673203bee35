"""A wheel (`pip install .`, not editable) ships every package and the presets: pyproject lists them all."""
from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_package_is_listed():
    st = _setuptools()
    dirs = {name: ROOT / path for name, path in st["package-dir"].items()}
    listed = set(st["packages"])
    found = set()
    for name, d in dirs.items():
        for init in d.rglob("__init__.py"):
            rel = init.parent.relative_to(d).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_presets_ship_as_package_data():
    st = _setuptools()
    assert st["package-dir"]["sparsetrain.configs"] == "configs" and "sparsetrain.configs" in st["packages"]
    globs = st["package-data"]["sparsetrain.configs"]
    shipped = {p for g in globs for p in (ROOT / "configs").glob(g)}
    assert shipped == set((ROOT / "configs").rglob("*.yaml")), "every preset, cluster and sweep file ships"
