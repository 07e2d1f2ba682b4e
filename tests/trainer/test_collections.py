"""The benchmark's image collections unlike Caltech: labelled folders, made the same every time."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench import collections
from vsearch.trainer.data import list_images, split_holdout


@pytest.mark.parametrize("name,images,classes", [("digits", 1797, 10), ("shapes", 960, 12),
                                                 ("textures", 800, 10), ("scenes", 800, 16)])
def test_each_collection_is_a_labelled_folder_the_trainer_reads(tmp_path, name, images, classes):
    out = collections.write(name, tmp_path / name)
    records = list_images(out)
    assert len(records) == images and len({r.label for r in records}) == classes
    train, held = split_holdout(records, 0.3, 0)
    assert {r.label for r in held} == {r.label for r in records}
    with Image.open(records[0].source) as im:
        assert im.mode == "RGB" and min(im.size) >= 64


def test_collections_are_a_function_of_the_seed():
    a, b = collections.make("shapes", seed=1), collections.make("shapes", seed=1)
    c = collections.make("shapes", seed=2)
    assert np.array_equal(np.asarray(a["star"][3]), np.asarray(b["star"][3]))
    assert not np.array_equal(np.asarray(a["star"][3]), np.asarray(c["star"][3]))
    with pytest.raises(ValueError, match="unknown collection"):
        collections.make("nope")
