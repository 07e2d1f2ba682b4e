"""The installed layout: every part under the one ``vsearch`` package (nothing generic at the
top of site-packages), every Python package of the tree listed, the default model inside."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_part_installs_under_vsearch():
    assert all(name == "vsearch" or name.startswith("vsearch.") for name in CONFIG["package-dir"])
    assert all(name.startswith("vsearch") for name in CONFIG["packages"])


def test_every_python_package_of_the_tree_is_listed():
    listed = set(CONFIG["packages"])
    for name, folder in CONFIG["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            dotted = ".".join([name, *rel.parts])
            assert dotted in listed, f"{init.parent} is a package missing from pyproject.toml's packages"


def test_the_default_model_ships_inside_the_package():
    from vsearch.predictor.model import default_model_dir, read_meta
    model = default_model_dir()
    assert (model / "config.json").exists() and read_meta(model).embedding_dim > 0
    data = CONFIG["package-data"]["vsearch.models.default"]
    assert all(any(p.match(pattern) for pattern in data) for p in model.iterdir() if p.is_file())
