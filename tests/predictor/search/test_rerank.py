"""Re-ranking and query parsing: pure functions on candidate lists and request fields."""

from __future__ import annotations

import numpy as np
import pytest
from kserve.errors import InvalidInput

from vsearch.core.store import filter_expr
from vsearch.predictor.protocol import decode_b64, parse_box
from vsearch.predictor.search.errors import BadQuery
from vsearch.predictor.search.query_store import query_hashes
from vsearch.predictor.search.request import parse_filter, parse_k, query_from_fields
from vsearch.predictor.search.rerank import Candidate, rerank
from vsearch.predictor.search.settings import SearchSettings


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def cand(i, score, vec=None, visibility="public", content_hash=None):
    return Candidate(id=str(i), score=score, vector=None if vec is None else unit(vec),
                     visibility=visibility, content_hash=content_hash)


def test_results_come_most_similar_first_and_at_most_k():
    rng = np.random.default_rng(0)
    cands = [cand(i, s, rng.normal(size=8)) for i, s in enumerate([0.3, 0.9, 0.5, 0.7, 0.1])]
    out = rerank(cands, 3, dedup_distance=0.0)
    assert [c.id for c in out] == ["1", "3", "2"]


def test_private_items_never_come_back():
    cands = [cand("a", 0.99, visibility="private"), cand("b", 0.5), cand("c", 0.4, visibility="private")]
    assert [c.id for c in rerank(cands, 10, 0.02)] == ["b"]


def test_same_content_hash_keeps_only_the_best():
    cands = [cand("a", 0.9, [1, 0, 0], content_hash="h1"), cand("b", 0.95, [0, 1, 0], content_hash="h1"),
             cand("c", 0.5, [0, 0, 1], content_hash="h2")]
    assert [c.id for c in rerank(cands, 10, 0.0)] == ["b", "c"]


def test_near_duplicate_embeddings_collapse_to_the_best_and_fill_up_to_k():
    base = np.array([1.0, 0, 0, 0])
    near = base + np.array([0, 0.05, 0, 0])         # cosine distance ~0.00125
    cands = [cand("best", 0.99, base), cand("dup", 0.98, near), cand("other", 0.6, [0, 1, 0, 0]),
             cand("third", 0.5, [0, 0, 1, 0]), cand("fourth", 0.4, [0, 0, 0, 1])]
    out = rerank(cands, 3, dedup_distance=0.02)
    assert [c.id for c in out] == ["best", "other", "third"]        # dup skipped, filled from extras
    assert [c.id for c in rerank(cands, 3, dedup_distance=0.0)] == ["best", "dup", "other"]


def test_items_farther_apart_than_the_threshold_are_kept():
    a, b = unit([1, 0.3, 0]), unit([1, -0.3, 0])
    distance = 1 - float(a @ b)
    cands = [cand("a", 0.9, a), cand("b", 0.8, b)]
    assert len(rerank(cands, 5, dedup_distance=distance * 0.9)) == 2
    assert len(rerank(cands, 5, dedup_distance=distance * 1.1)) == 1


def test_k_is_parsed_and_bounded():
    s = SearchSettings(k_default=20, k_max=50)
    assert parse_k(None, s) == 20 and parse_k("", s) == 20
    assert parse_k("7", s) == 7 and parse_k(50, s) == 50 and parse_k(3.0, s) == 3
    for bad in (0, 51, -1, "x", 2.5, True, "nan", "inf"):
        with pytest.raises(BadQuery, match="k must"):
            parse_k(bad, s)


def test_crop_must_be_four_numbers_in_range():
    assert parse_box("0.1,0.2,0.5,0.9") == (0.1, 0.2, 0.5, 0.9)
    assert parse_box([0, 0, 1, 1]) == (0.0, 0.0, 1.0, 1.0)
    assert parse_box(None) is None and parse_box("") is None
    for bad in ("0.1,0.2,1.5,0.9", "0.5,0.5,0.2,0.9", "a,b,c,d", [0.1, 0.2, 0.3]):
        with pytest.raises(InvalidInput):
            parse_box(bad)


def test_filters_name_known_fields_only_and_become_safe_expressions():
    allowed = ("label", "source")
    spec = parse_filter('{"label": ["cat", "dog"], "source": "caltech"}', allowed)
    assert spec == {"label": ["cat", "dog"], "source": ["caltech"]}
    assert filter_expr(spec) == \
        '(metadata["label"] == "cat" or metadata["label"] == "dog") and metadata["source"] == "caltech"'
    # quotes in values cannot break out of the expression
    assert filter_expr(parse_filter({"label": 'x" or 1==1 or "'}, allowed)) == \
        'metadata["label"] == "x\\" or 1==1 or \\""'
    with pytest.raises(BadQuery, match="unknown filter field 'colour'"):
        parse_filter({"colour": "red"}, allowed)
    for bad in ("not json", "[1, 2]", {"label": {"nested": 1}}, {"label": []}, {"label": True}):
        with pytest.raises(BadQuery):
            parse_filter(bad, allowed)
    assert parse_filter(None, allowed) == {} and filter_expr({}) == ""


def test_query_fields_need_exactly_one_image_source():
    s = SearchSettings()
    q = query_from_fields({"image_b64": "aGVsbG8=", "crop": [0, 0, .5, .5], "k": 3}, s, None)
    assert q.image == b"hello" and q.crop == (0, 0, .5, .5) and q.k == 3
    with pytest.raises(BadQuery, match="exactly one"):
        query_from_fields({"k": 3}, s, None)
    with pytest.raises(BadQuery, match="unknown field"):
        query_from_fields({"image_b64": "aGVsbG8=", "top": 3}, s, None)
    with pytest.raises(BadQuery, match="turned off"):
        query_from_fields({"url": "http://example.com/a.jpg"}, s, None)
    with pytest.raises(InvalidInput, match="base64"):
        decode_b64("%%%not base64")
    assert decode_b64("data:image/png;base64,aGVsbG8=") == b"hello"


def test_query_hash_depends_on_the_crop_and_the_image_hash_does_not():
    image_hash, query_hash = query_hashes(b"pixels", None)
    assert image_hash == query_hash
    image_hash2, query_hash2 = query_hashes(b"pixels", (0, 0, .5, .5))
    assert image_hash2 == image_hash and query_hash2 != query_hash
