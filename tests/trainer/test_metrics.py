"""Retrieval metrics: hand-computed cases, the classic traps, and scikit-learn as an
independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vsearch.trainer import metrics as M

# --------------------------------------------------------------------------- hand-computed

def test_binary_ranking_by_hand():
    # ranked: relevant, not, relevant, not; 2 relevant in the collection
    rel = [[1, 0, 1, 0]]
    assert M.reciprocal_rank(rel)[0] == 1.0
    assert M.precision_at_k(rel, 1)[0] == 1.0
    assert M.precision_at_k(rel, 2)[0] == 0.5
    assert M.precision_at_k(rel, 3)[0] == pytest.approx(2 / 3)
    assert M.recall_at_k(rel, 1)[0] == 0.5
    assert M.recall_at_k(rel, 3)[0] == 1.0
    assert M.average_precision(rel)[0] == pytest.approx((1 / 1 + 2 / 3) / 2)
    # mAP@R looks at the top R = 2 only: one hit at rank 1 -> (1/1) / 2
    assert M.average_precision_at_r(rel)[0] == pytest.approx(0.5)


def test_relevant_items_missing_from_a_truncated_list_count_against_the_query():
    rel = [[0, 0, 1]]                       # 3 relevant exist, only one was retrieved
    assert M.reciprocal_rank(rel, [3])[0] == pytest.approx(1 / 3)
    assert M.recall_at_k(rel, 3, [3])[0] == pytest.approx(1 / 3)
    assert M.average_precision(rel, [3])[0] == pytest.approx((1 / 3) / 3)
    assert M.average_precision_at_r(rel, [3])[0] == pytest.approx((1 / 3) / 3)


def test_precision_at_k_beyond_the_list_divides_by_k():
    assert M.precision_at_k([[1, 1]], 4)[0] == 0.5


def test_graded_ndcg_by_hand():
    # The textbook example: grades 3,2,3,0,1,2 in ranked order; linear gains.
    rel = [[3, 2, 3, 0, 1, 2]]
    dcg = 3 + 2 / math.log2(3) + 3 / 2 + 0 + 1 / math.log2(6) + 2 / math.log2(7)
    ideal = 3 + 3 / math.log2(3) + 2 / 2 + 2 / math.log2(5) + 1 / math.log2(6)
    assert dcg == pytest.approx(6.861, abs=1e-3) and ideal == pytest.approx(7.141, abs=1e-3)
    assert M.ndcg_at_k(rel, 6)[0] == pytest.approx(dcg / ideal)
    assert M.ndcg_at_k(rel, 6)[0] == pytest.approx(0.961, abs=1e-3)
    # the ideal comes from every judged grade, not only the retrieved ones
    assert M.ndcg_at_k([[3, 0]], 2, ideal=[[3, 5, 0]])[0] == pytest.approx(3 / (5 + 3 / math.log2(3)))


def test_queries_without_relevant_items_are_reported_not_averaged_in():
    rel = np.array([[1, 0, 0], [0, 0, 0]])
    assert math.isnan(M.average_precision(rel)[1])
    assert math.isnan(M.recall_at_k(rel, 1)[1])
    report = M.summarise(rel, ks=(1,))
    assert report["queries"] == 2
    assert report["queries_evaluated"] == 1
    assert report["queries_without_relevant"] == 1
    assert report["metrics"]["map"] == 1.0          # not 0.5: the empty query is left out
    assert report["metrics"]["recall@1"] == 1.0


def test_ties_are_broken_pessimistically_unless_asked_otherwise():
    scores = [[0.5, 0.5, 0.1]]
    relevance = [[1, 0, 0]]
    pess = M.rank_by_scores(scores, relevance)
    opt = M.rank_by_scores(scores, relevance, ties="optimistic")
    assert pess.tolist() == [[0, 1, 0]] and opt.tolist() == [[1, 0, 0]]
    assert M.reciprocal_rank(pess)[0] == 0.5 and M.reciprocal_rank(opt)[0] == 1.0


def test_a_collapsed_model_earns_nothing_from_the_order_of_the_data():
    labels = np.repeat(np.arange(4), 5)               # sorted by class, like labels.csv
    report = M.evaluate_embeddings(np.ones((20, 8)), labels, ks=(1, 5))
    assert report["metrics"]["recall@1"] == 0.0
    assert report["metrics"]["map@r"] == 0.0


def test_the_query_never_matches_itself():
    # Each item's nearest *other* item is of the other class: recall@1 is 0, where a query
    # allowed to find itself would score 1.
    angles = np.radians([0, 10, 90, 100])
    emb = np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = ["a", "b", "a", "b"]
    report = M.evaluate_embeddings(emb, labels, ks=(1, 2))
    assert report["metrics"]["recall@1"] == 0.0
    assert report["metrics"]["recall@2"] == 0.5       # class-mates come 2nd for a0, b1; 3rd for b0, a1
    assert report["metrics"]["map@r"] == 0.0
    assert report["metrics"]["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)


def test_singleton_classes_are_reported_as_queries_without_relevant_items():
    emb = np.eye(5)
    report = M.evaluate_embeddings(emb, ["a", "a", "b", "c", "d"], ks=(1,))
    assert report["queries_without_relevant"] == 3
    assert report["queries_evaluated"] == 2


def test_known_good_ranking_beats_random_beats_known_bad():
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 6, size=(25, 60)).astype(float)   # 25 queries, graded candidates
    grades[grades < 3] = 0
    rankings = {"good": grades, "random": rng.random(grades.shape), "bad": -grades}
    r = {name: M.summarise(M.rank_by_scores(scores, grades), ks=(1, 10), ideal=grades)["metrics"]
         for name, scores in rankings.items()}
    for metric in ("map@r", "map", "mrr", "recall@10", "precision@10", "ndcg@10"):
        assert r["good"][metric] > r["random"][metric] > r["bad"][metric], metric
    assert r["good"]["map"] == 1.0 and r["good"]["ndcg@10"] == 1.0
    assert r["bad"]["recall@10"] == 0.0


def test_clustered_embeddings_beat_random_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 8)
    good = rng.normal(size=(10, 32))[labels] + 0.3 * rng.normal(size=(80, 32))
    random = rng.normal(size=(80, 32))
    g = M.evaluate_embeddings(good, labels, ks=(1, 10))["metrics"]
    b = M.evaluate_embeddings(random, labels, ks=(1, 10))["metrics"]
    assert g["map@r"] > 0.9 > 0.3 > b["map@r"]
    assert g["recall@1"] > b["recall@1"]


def test_shape_checks_say_what_is_wrong():
    with pytest.raises(ValueError, match="2-D"):
        M.average_precision([1, 0, 1])
    with pytest.raises(ValueError, match="n_relevant must have shape"):
        M.recall_at_k([[1, 0]], 1, n_relevant=[1, 1])
    with pytest.raises(ValueError, match="n_relevant=1 but 2 relevant"):
        M.average_precision([[1, 1]], n_relevant=[1])
    with pytest.raises(ValueError, match="positive integer"):
        M.precision_at_k([[1]], 0)
    with pytest.raises(ValueError, match="labels must have shape"):
        M.evaluate_embeddings(np.ones((3, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="differ in shape"):
        M.rank_by_scores(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        M.evaluate_embeddings(np.array([[np.nan, 1.0], [1.0, 0.0]]), ["a", "a"])


# --------------------------------------------------------------------------- golden sets

def test_ranked_lists_against_graded_judgments():
    judgments = {"q1": {"a": 5, "b": 3, "c": 0, "q1": 5},
                 "q2": {"x": 2},
                 "q3": {"y": 0}}                       # nothing relevant: reported
    rankings = {"q1": ["q1", "b", "zzz", "a"],          # itself (dropped), unjudged -> 0
                "q4": ["a"]}                            # no judgments: counted, left out
    report = M.evaluate_ranked_lists(rankings, judgments, ks=(1, 3))
    assert report["queries"] == 3
    assert report["queries_without_relevant"] == 1
    assert report["queries_without_judgments"] == 1
    # q1 ranks b (3), zzz (0), a (5); relevant = a, b. q2 got no ranking -> 0.
    m = report["metrics"]
    assert m["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@3"] == pytest.approx((1 + 0) / 2)
    assert m["mrr"] == pytest.approx((1 + 0) / 2)
    assert m["map"] == pytest.approx(((1 / 1 + 2 / 3) / 2 + 0) / 2)
    ndcg_q1 = (3 + 0 + 5 / 2) / (5 + 3 / math.log2(3))
    assert m["ndcg@3"] == pytest.approx((ndcg_q1 + 0) / 2)


def test_judgments_from_embeddings_rank_by_cosine():
    q = np.array([[1.0, 0.0]])
    cands = np.array([[0.0, 1.0], [1.0, 0.1], [0.7, 0.7]])
    report = M.evaluate_judgments(q, ["q"], cands, ["far", "near", "mid"],
                                  {"q": {"near": 5, "mid": 1, "far": 0}}, ks=(1, 2))
    assert report["metrics"]["ndcg@2"] == pytest.approx(1.0)
    assert report["metrics"]["recall@1"] == 0.5


def test_judgment_grades_must_be_0_to_5():
    with pytest.raises(ValueError, match="0..5"):
        M.evaluate_ranked_lists({"q": ["a"]}, {"q": {"a": 7}})


# --------------------------------------------------------------------------- scikit-learn

def test_average_precision_matches_scikit_learn():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        y = (rng.random(n) < 0.3).astype(int)
        if y.sum() == 0:
            y[0] = 1
        s = rng.random(n)                                   # continuous: no ties
        ours = M.average_precision(M.rank_by_scores(s[None], y[None]))[0]
        assert ours == pytest.approx(average_precision_score(y, s))


def test_ndcg_matches_scikit_learn():
    from sklearn.metrics import ndcg_score
    rng = np.random.default_rng(2)
    y = rng.integers(0, 6, size=(30, 40)).astype(float)     # graded 0..5
    s = rng.random((30, 40))
    ranked = M.rank_by_scores(s, y)
    for k in (1, 5, 10, 40):
        ours = M.ndcg_at_k(ranked, k, ideal=y)
        assert np.nanmean(ours) == pytest.approx(ndcg_score(y, s, k=k), abs=1e-10)


def test_recall_and_precision_at_k_match_scikit_learn_on_the_top_k():
    from sklearn.metrics import precision_score, recall_score
    rng = np.random.default_rng(3)
    y = (rng.random(50) < 0.4).astype(int)
    s = rng.random(50)
    ranked = M.rank_by_scores(s[None], y[None])
    for k in (1, 5, 20):
        predicted = np.zeros(50, int)
        predicted[np.argsort(-s)[:k]] = 1
        assert M.recall_at_k(ranked, k)[0] == pytest.approx(recall_score(y, predicted))
        assert M.precision_at_k(ranked, k)[0] == pytest.approx(precision_score(y, predicted))


@pytest.mark.parametrize("text, message", [
    ("q,c,g\na,b,1\n", "needs the columns query,candidate,grade"),
    ("query,candidate,grade\na,b,high\n", "line 2: grade 'high' is not a number"),
    ("query,candidate,grade\na,b,1\na,c,7\n", "line 3: grade 7.0 is outside 0..5"),
    ("query,candidate,grade\na, ,1\n", "line 2: empty query or candidate"),
    ("", "needs the columns"),
])
def test_bad_judgments_are_refused_with_the_source_and_line(text, message):
    with pytest.raises(M.JudgmentsError, match=message):
        M.parse_judgments(text, "golden.csv")


def test_judgments_parse_to_grades_per_query():
    text = "query,candidate,grade\ncatalog:a, b ,2\ncatalog:a,c,0\nx.jpg,d,5\n"
    assert M.parse_judgments(text) == {"catalog:a": {"b": 2.0, "c": 0.0}, "x.jpg": {"d": 5.0}}
