"""Fixtures of the trainer tests: a few dozen real photos laid out as a labelled folder."""

from __future__ import annotations

import shutil

import pytest

from vsearch.local.samples import CALTECH, caltech_photos


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """32 real Caltech-101 photos, 4 classes x 8, as ``<class>/<name>.jpg``."""
    photos = caltech_photos(n_classes=4, per_class=8)
    if not photos:
        pytest.skip(f"Caltech-101 subset not found at {CALTECH} (set VSEARCH_CALTECH_DIR)")
    root = tmp_path_factory.mktemp("photos")
    for path, label in photos:
        (root / label).mkdir(exist_ok=True)
        shutil.copy(path, root / label / path.name)
    return root
