"""The simulated users' click model: position bias and relevance as the position-based model
says, and relevance read from the catalog's labels (the query image itself is not relevant)."""

from __future__ import annotations

import numpy as np
import pytest

from vsearch.local.simusers import ClickModel, relevance


def test_clicks_follow_the_position_based_model():
    model = ClickModel(eta=1.0, relevant=0.6, irrelevant=0.05)
    rng = np.random.default_rng(7)
    shown = [True, False, True, True, False]
    n = 20_000
    counts = np.zeros(len(shown))
    for _ in range(n):
        for r in model.clicks(shown, rng):
            counts[r - 1] += 1
    expected = np.array([0.6, 0.05 / 2, 0.6 / 3, 0.6 / 4, 0.05 / 5])
    assert np.allclose(model.probabilities(shown), expected)
    assert np.all(np.abs(counts / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n)), counts / n
    # the same relevant result earns three times fewer clicks at rank 3 than at rank 1
    assert model.p_click(1, True) / model.p_click(3, True) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        ClickModel(relevant=1.5)


def test_relevance_is_the_same_label_and_not_the_query_itself():
    results = [{"id": "cat-original", "metadata": {"label": "cat"}}, {"id": "cat-flip", "metadata": {"label": "cat"}},
               {"id": "dog-original", "metadata": {"label": "dog"}}, {"id": "cat-grey", "metadata": {}}]
    assert relevance(results, "cat-original", "cat", labels={"cat-grey": "cat"}) == [False, True, False, True]
    assert relevance(results, "x", None) == [False] * 4
