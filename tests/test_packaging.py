"""The installed layout: every part under the one ``vsearch`` package (nothing generic at the
top of site-packages), every Python package of the tree listed, the default model inside."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vsearch.predictor.model_dir import default_model_dir, read_meta

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


PARTS = ("core", "predictor", "ingest", "trainer", "operators", "models")


def test_every_part_installs_under_vsearch():
    assert "package-dir" not in CONFIG, "the package is the folder vsearch/ as it is: no mapping"
    assert all(name == "vsearch" or name.startswith("vsearch.") for name in CONFIG["packages"])


def test_every_python_package_of_the_tree_is_listed():
    listed = set(CONFIG["packages"])
    for init in (REPO / "vsearch").rglob("__init__.py"):
        dotted = ".".join(init.parent.relative_to(REPO).parts)
        assert dotted in listed, f"{init.parent} is a package missing from pyproject.toml's packages"


def test_the_default_model_ships_inside_the_package():
    model = default_model_dir()
    assert (model / "config.json").exists() and read_meta(model).embedding_dim > 0
    data = CONFIG["package-data"]["vsearch.models.default"]
    assert all(any(p.match(pattern) for pattern in data) for p in model.iterdir() if p.is_file())


def test_the_design_folders_link_into_the_package():
    """core/, predictor/, ... at the top of the checkout (where DESIGN.md names them) are links to
    vsearch/<part>/, the package's real folders."""
    for part in PARTS:
        top = REPO / part
        assert top.is_symlink() and top.resolve() == (REPO / "vsearch" / part).resolve(), part
        assert not (REPO / "vsearch" / part).is_symlink(), f"vsearch/{part} must be the real folder"


@pytest.mark.parametrize("part", PARTS)
def test_a_folder_imported_by_its_bare_name_fails_loudly(part):
    out = subprocess.run([sys.executable, "-c", f"import {part}"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert f"import vsearch.{part}, not {part}" in out.stderr


def test_the_checkout_imports_without_the_install_hook(tmp_path):
    """With the editable install's import hook taken away and only the checkout on the path,
    ``vsearch.core.store`` is the file vsearch/core/store.py: what a static tool resolves."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)];"
            f"sys.path.insert(0, {str(REPO)!r});"
            "import vsearch.core.store, vsearch.ingest.events, vsearch.local.services;"
            "print(vsearch.core.store.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "vsearch" / "core" / "store.py"
