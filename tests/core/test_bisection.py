"""The one bisect helper: a batch call refused because of some of its items is split until
each refusal is one item's; outages propagate at once."""

from __future__ import annotations

import pytest

from vsearch.core.bisection import bisect


class Bad(ValueError):
    pass


def refusing(bad: set, calls: list):
    def call(items):
        calls.append(list(items))
        hit = [i for i in items if i in bad]
        if hit:
            raise Bad(f"refused {hit[0]}")
        return sum(items)
    return call


def test_the_good_items_pass_in_few_calls_and_each_refusal_is_pinned_on_its_item():
    calls: list = []
    parts = bisect(list(range(16)), refusing({5, 11}, calls), refused=lambda e: isinstance(e, Bad))
    assert [i for p in parts for i in p.items] == list(range(16))          # in order, nothing lost
    assert [(p.items, str(p.error)) for p in parts if p.error] == [([5], "refused 5"), ([11], "refused 11")]
    assert sum(p.result for p in parts if p.error is None) == sum(range(16)) - 5 - 11
    assert all(p.result is None for p in parts if p.error)
    assert len(calls) < 16                       # not one call per item
    assert calls[0] == list(range(16))


def test_a_batch_without_refusals_is_one_call_and_an_empty_one_none():
    calls: list = []
    assert [(p.items, p.result) for p in bisect([1, 2, 3], refusing(set(), calls), lambda e: True)] == [([1, 2, 3], 6)]
    assert calls == [[1, 2, 3]]
    assert bisect([], refusing(set(), calls), lambda e: True) == [] and len(calls) == 1


def test_every_item_refused():
    parts = bisect(["a", "b", "c"], refusing({"a", "b", "c"}, []), lambda e: isinstance(e, Bad))
    assert [(p.items, type(p.error)) for p in parts] == [(["a"], Bad), (["b"], Bad), (["c"], Bad)]


def test_an_error_that_is_not_a_refusal_propagates_at_once():
    calls: list = []

    def outage(items):
        calls.append(items)
        raise ConnectionError("away")

    with pytest.raises(ConnectionError):
        bisect([1, 2, 3, 4], outage, refused=lambda e: not isinstance(e, ConnectionError))
    assert calls == [[1, 2, 3, 4]]               # not split: an outage is no item's fault
