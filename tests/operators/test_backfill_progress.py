"""The backfill's progress figures: the rate is the last interval's, and a count that stands
still shows no rate (a decaying average kept showing one for minutes after the last item)."""

from __future__ import annotations

from types import SimpleNamespace

from vsearch.local.demo_rollout import rollout_spec
from vsearch.operators import crd
from vsearch.operators.rollout import Env, Step, iso
from vsearch.operators.spec import IndexSpec, VersionRef


class Counts:
    def __init__(self):
        self.n = {"serving": 100, "cand": 0}

    def count(self, collection):
        return self.n[collection]


def ready(*_args):
    return SimpleNamespace(ready=True, url="http://127.0.0.1:1", message="")


def step_at(t: float, status: dict, store: Counts) -> Step:
    env = Env(workloads=SimpleNamespace(ensure_embedder=ready, ensure_ingest=ready), store=store,
              groups=SimpleNamespace(committed=lambda group: {"catalog.images/0": 1}),
              embedder=lambda url: None, fetcher=None, query_fetcher=None, now=lambda: t)
    spec = rollout_spec(bootstrap="127.0.0.1:1", milvus_uri="http://127.0.0.1:2", alias="images",
                        name="m", version="1", uri="/m", idle_s=1000)
    s = Step("demo", "local", {"metadata": {"generation": 1}, "spec": spec, "status": status}, env)
    assert s.status_error is None
    s.spec = IndexSpec.from_dict(spec)
    return s


def test_the_rate_is_the_last_intervals_and_a_flat_count_shows_none():
    store = Counts()
    status = {"phase": "Backfilling",
              "serving": {"model": "m", "version": "1", "collection": "serving", "consumerGroup": "g1"},
              "candidate": {"model": "m", "version": "2", "collection": "cand", "consumerGroup": "g",
                            "backfillStartedAt": iso(1000.0)}}
    cand = VersionRef(index="demo", namespace="local", model="m", version="2", uri="/m2",
                      collection="cand", group="g")
    progress = []
    for t, count in [(1000.0, 0), (1010.0, 50), (1020.0, 50), (1030.0, 50), (1040.0, 80)]:
        store.n["cand"] = count
        s = step_at(t, status, store)
        s.backfilling(cand)
        status = s.status
        crd.validate({"spec": s.body["spec"], "status": status})        # what the CRD declares
        progress.append((status["candidate"]["progress"].get("ratePerSecond"), status["message"]))
    rates = [r for r, _ in progress[1:]]
    assert rates == [5.0, 0.0, 0.0, 3.0]
    assert "5.0/s" in progress[1][1]
    assert "none new" in progress[2][1] and "/s" not in progress[2][1]
    assert "3.0/s" in progress[4][1]
