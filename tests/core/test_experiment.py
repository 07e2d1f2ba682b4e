"""Online experiments, the pure part: the property's JSON, sticky and uniform assignment of
randomisation units, and team-draft interleaving's properties."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare, pearsonr

from vsearch.core.experiment import (
    Experiment,
    assign,
    bucket,
    in_experiment,
    new_experiment,
    team_draft,
    unit_id,
)


def test_the_property_round_trips_and_anything_else_means_no_experiment(caplog):
    exp = new_experiment("interleave", 0.1, "images__b__2", "images__a__1", now_ms=1764670000000)
    text = exp.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert Experiment.parse(text) == exp and exp.id.startswith("exp-") and len(exp.salt) == 32
    assert new_experiment("ab", 0.1, "images__b__2", "images__a__1", 0).salt != exp.salt
    assert Experiment.parse("") is None and Experiment.parse(None) is None
    with caplog.at_level(logging.WARNING):
        for bad in ("{", "[]", json.dumps({**json.loads(text), "design": "bandit"}),
                    json.dumps({**json.loads(text), "share": 0}), json.dumps({**json.loads(text), "extra": 1}),
                    json.dumps({**json.loads(text), "candidate": "images__a__1"})):
            assert Experiment.parse(bad) is None, bad
    assert "design must be one of ab, interleave" in caplog.text and "share must be" in caplog.text
    with pytest.raises(ValueError, match="share must be a number in"):
        new_experiment("ab", 1.5, "images__b__2", "images__a__1", 0)


def test_assignment_is_sticky_uniform_and_independent_across_experiments():
    salt_a, salt_b = "0" * 32, "f" * 32
    units = [f"user-{i}" for i in range(20_000)]
    a = np.array([bucket(u, salt_a) for u in units])
    # sticky: a pure function of (unit, salt)
    assert all(bucket(u, salt_a) == x for u, x in zip(units[:100], a[:100]))
    assert ((0 <= a) & (a < 1)).all()
    # uniform: 20 equal bins
    counts = np.histogram(a, bins=20, range=(0, 1))[0]
    assert chisquare(counts).pvalue > 0.001, counts
    # a 10 % share takes 10 % of the units (±4 standard deviations)
    exp = Experiment("exp-0123456789abcdef", "ab", 0.1, salt_a, "images__b__2", "images__a__1", 0)
    inside = sum(in_experiment(exp, u) for u in units)
    assert abs(inside - 2000) < 4 * (20_000 * 0.1 * 0.9) ** 0.5
    assert {assign(exp, u) for u in units} == {"candidate", "serving"}
    inter = Experiment("exp-0123456789abcdef", "interleave", 0.1, salt_a, "images__b__2", "images__a__1", 0)
    assert [assign(inter, u) == "interleaved" for u in units[:500]] == [in_experiment(exp, u) for u in units[:500]]
    assert {assign(inter, u) for u in units} == {"interleaved", "outside"}
    # another experiment (another salt) draws its units independently of this one
    b = np.array([bucket(u, salt_b) for u in units])
    assert abs(pearsonr(a, b).statistic) < 0.03
    # events carry a salted hash of the unit, never the unit
    ev = exp.event("user-1")
    assert ev == {"id": exp.id, "design": "ab", "arm": assign(exp, "user-1"), "unit": unit_id("user-1", salt_a)}
    assert len(ev["unit"]) == 16 and "user-1" not in json.dumps(ev) and unit_id("user-1", salt_b) != ev["unit"]


rankings = st.lists(st.sampled_from([f"i{n}" for n in range(30)]), max_size=25, unique=True)


@settings(max_examples=100, deadline=None)
@given(a=rankings, b=rankings, k=st.integers(0, 30), seed=st.text(max_size=8))
def test_team_draft_properties(a, b, k, seed):
    out = team_draft(a, b, k, seed)
    ids = [i for i, _ in out]
    assert len(ids) == len(set(ids)) == min(k, len(set(a) | set(b)))
    assert out == team_draft(a, b, k, seed)                        # deterministic in the seed
    for team, ranking in (("serving", a), ("candidate", b)):
        picked = [i for i, t in out if t == team]
        assert set(picked) <= set(ranking)
        assert picked == sorted(picked, key=ranking.index)        # in its ranking's order
        # each pick is the best item of its ranking not shown before it
        for n, (i, t) in enumerate(out):
            if t == team:
                assert i == next(x for x in ranking if x not in ids[:n])
    # balanced: while both rankings still have an unshown item, neither team is two picks ahead
    for n in range(1, len(out) + 1):
        shown = set(ids[:n])
        if set(a) - shown and set(b) - shown:
            s = sum(t == "serving" for _, t in out[:n])
            assert abs(s - (n - s)) <= 1, out[:n]


def test_team_draft_of_one_ranking_is_that_ranking_and_splits_credit_fairly():
    ranking = [f"i{n}" for n in range(10)]
    firsts = []
    for q in range(2000):
        out = team_draft(ranking, ranking, 10, seed=f"query-{q}")
        assert [i for i, _ in out] == ranking       # the same ranking from both: shown unchanged
        firsts.append(out[0][1])
    # which team picks first is a fair coin over queries (a click on rank 1 credits either)
    assert abs(firsts.count("serving") - 1000) < 4 * 500 ** 0.5
