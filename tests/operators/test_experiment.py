"""The rollout's ``Experimenting`` phase end to end: ``vsearch operator`` (kopf) against kmock's
Kubernetes API, real Milvus (``milvus-lite server``: the experiment is the serving collection's
property ``vsearch.experiment``) and the real Tansu broker carrying the search events the
analysis reads. The events are written here as the search services write them (the contract's
§2: each impression and click with the experiment's id, arm and unit), so that the figures are
known exactly; the search service's side has its own tests.

Each index starts in ``Verifying`` with its two versions' collections made here and a gate
with no checks, so no embedder has to start: the phase under test is what follows the gate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import requests

from tests.fixtures.cluster import searchindex
from tests.fixtures.operators import unique
from vsearch.core.experiment import EXPERIMENT_KEY
from vsearch.core.kafka import ensure_topics, send_and_confirm
from vsearch.core.search_events import decode, encode
from vsearch.core.store import MilvusStore
from vsearch.operators.rollout import Env, reconcile
from vsearch.operators.spec import ModelRef, VersionRef
from vsearch.operators.trust import Trust

DIM = 8
TS = 1_764_670_000_000


def versions(name: str) -> tuple[VersionRef, VersionRef]:
    return tuple(VersionRef.of(name, "vs", ModelRef("m", v, f"/models/{v}")) for v in ("1", "2"))


def prepare(cluster, store: MilvusStore, *, name: str, broker: str, milvus: str, experiment: dict) -> dict:
    """Index ``name``: version 1 serves (its alias), version 2 passed the backfill; both collections
    exist with their model records; the SearchIndex is created in ``Verifying``."""
    v1, v2 = versions(name)
    alias = unique("x_")
    for v in (v1, v2):
        store.ensure_model_collection(v.collection, DIM, {"model": v.model, "version": v.version,
                                                         "embedder_url": "", "searchindex": v.owner})
    store.switch_alias(alias, v1.collection)
    topic = unique("events-")
    ensure_topics(broker, {topic: 2})
    obj = searchindex(name, bootstrap=broker, topic=unique("catalog-"), milvus_uri=milvus, alias=alias,
                      model="m", version="2", uri="/models/2", requireApproval=True,
                      gate={"sampleSize": 0, "requireOfflineVerdict": False},
                      experiment={"enabled": True, "eventsTopic": topic, **experiment})
    obj["status"] = {"phase": "Verifying",
                     "serving": {**v1.to_status(), "since": "2026-01-01T00:00:00Z"},
                     "candidate": {**v2.to_status(), "embedderUrl": "http://127.0.0.1:9", "dim": DIM,
                                   "startedAt": "2026-01-01T00:00:00Z", "attempts": 0}}
    status = obj.pop("status")
    cluster.api.create("searchindexes", obj)
    cluster.api.patch("searchindexes", name, {"status": status}, sub="status")
    return {"alias": alias, "topic": topic, "serving": v1, "candidate": v2}


def search_events(exp: dict, arm: str, units: range, clicks_of, *, took_ms: float = 40.0) -> list:
    """One search per unit in ``arm``, its impression (5 results) and the clicks ``clicks_of(i)``
    names (ranks), as the search service writes them."""
    out = []
    for i in units:
        qid = f"{exp['id']}-{arm}-{i}"
        x = {"id": exp["id"], "design": exp["design"], "arm": arm, "unit": f"{arm[0]}{i:015x}"}
        results = [{"id": f"item-{r}", "rank": r, "score": 1 - r / 10} for r in range(1, 6)]
        version = exp["candidate" if arm == "candidate" else "serving"]
        out.append((qid.encode(), encode({"schema": 1, "type": "impression", "query_id": qid, "query_hash": qid,
                                          "model_version": version, "results": results, "ts": TS + i,
                                          "took_ms": took_ms, "error": False, "experiment": x})))
        for rank in clicks_of(i):
            out.append((qid.encode(), encode({"schema": 1, "type": "click", "query_id": qid, "query_hash": qid,
                                              "item_id": f"item-{rank}", "rank": rank, "model_version": version,
                                              "ts": TS + i + 1, "experiment": x})))
    return out


def started(cluster, name: str) -> dict:
    return cluster.wait_for(name, lambda s: (s.get("experiment") or {}).get("propertyWritten"), 60,
                            "the experiment started")["status"]["experiment"]


def prop(store: MilvusStore, collection: str) -> str | None:
    return (store.client.describe_collection(collection).get("properties") or {}).get(EXPERIMENT_KEY)


def test_experiments_start_promote_abort_survive_sigkill_without_double_counting_and_refuse_bad_specs(
        cluster, broker, milvus_server_uri):
    """One operator, four indexes: "better" (killed while it experiments), "worse", "slow" (a
    guardrail) and "bad" (an invalid experiment spec)."""
    with MilvusStore(milvus_server_uri) as store:
        ix = prepare(cluster, store, name="better", broker=broker, milvus=milvus_server_uri,
                     experiment={"minUnits": 150, "share": 0.2})
        worse = prepare(cluster, store, name="worse", broker=broker, milvus=milvus_server_uri,
                        experiment={"minUnits": 60})
        slow = prepare(cluster, store, name="slow", broker=broker, milvus=milvus_server_uri,
                       experiment={"minUnits": 60, "guardrails": {"maxP99Ratio": 1.5}})
        cluster.api.create("searchindexes", searchindex(
            "bad", bootstrap=broker, topic="c", milvus_uri=milvus_server_uri, alias="bad_a", model="m", version="1",
            uri="/m", experiment={"enabled": True, "share": 0.7, "design": "bandit"}))
        cluster.start_operator()

        exp = started(cluster, "better")
        assert exp["id"].startswith("exp-") and exp["design"] == "ab" and exp["share"] == 0.2
        assert exp["servingCollection"] == ix["serving"].collection and exp["candidate"] == "2"
        written = json.loads(prop(store, ix["serving"].collection))
        assert written == {"id": exp["id"], "design": "ab", "share": 0.2, "salt": exp["salt"],
                           "candidate": ix["candidate"].collection, "serving": ix["serving"].collection,
                           "started": exp["started"]}
        # the first half: serving users click 3 searches in 10, the candidate's 9 in 10
        first = (search_events(exp, "serving", range(50), lambda i: [1] if i % 10 < 3 else [])
                 + search_events(exp, "candidate", range(50), lambda i: [1] if i % 10 < 9 else []))
        send_and_confirm(broker, ix["topic"], first)
        # "worse": the candidate's users click 1 in 10, serving's 5 in 10
        e_worse, e_slow = started(cluster, "worse"), started(cluster, "slow")
        send_and_confirm(broker, worse["topic"],
                         search_events(e_worse, "serving", range(80), lambda i: [1] if i % 10 < 5 else [])
                         + search_events(e_worse, "candidate", range(80), lambda i: [1] if i % 10 == 0 else []))
        # "slow": clicks alike, but the candidate answers 10x slower (p99 is judged from 200 searches a side)
        send_and_confirm(broker, slow["topic"],
                         search_events(e_slow, "serving", range(200), lambda i: [1] if i % 2 else [], took_ms=40)
                         + search_events(e_slow, "candidate", range(200), lambda i: [1] if i % 2 else [],
                                         took_ms=400))
        st = cluster.wait_for("better", lambda s: ((s.get("experiment") or {}).get("arms") or {})
                              .get("candidate", {}).get("impressions") == 50, 60, "the first half counted")["status"]
        assert st["phase"] == "Experimenting" and st["experiment"]["decision"] == "continue", st["experiment"]
        assert st["experiment"]["arms"]["serving"]["clicks"] == 15 and st["experiment"]["arms"]["candidate"]["clicks"] == 45

        cluster.kill_operator()                          # SIGKILL while Experimenting
        # the second half, and the first one delivered again (a producer's retry, a replay)
        second = (search_events(exp, "serving", range(50, 100), lambda i: [1] if i % 10 < 3 else [])
                  + search_events(exp, "candidate", range(50, 100), lambda i: [1] if i % 10 < 9 else []))
        send_and_confirm(broker, ix["topic"], second + first)
        cluster.start_operator()
        st = cluster.wait_phase("better", "AwaitingApproval", 60)["status"]
        e = st["experiment"]
        assert (e["id"], e["salt"], e["started"]) == (exp["id"], exp["salt"], exp["started"])   # the same one
        arms = e["arms"]
        assert (arms["serving"]["impressions"], arms["serving"]["clicks"]) == (100, 30), arms
        assert (arms["candidate"]["impressions"], arms["candidate"]["clicks"]) == (100, 90), arms
        assert arms["serving"]["units"] == arms["candidate"]["units"] == 100
        assert e["decision"] == "promote" and e["decidedAt"] and e["endedAt"], e
        assert prop(store, ix["serving"].collection) == ""              # the search services stop it
        assert store.describe_alias(ix["alias"]) == ix["serving"].collection      # the switch waits for approval
        assert f"experiment {exp['id']}" in st["message"] and "promote" in st["message"]
        reasons = [ev.get("reason") for ev in cluster.events("better")]
        for r in ("Experimenting", "ExperimentStarted", "ExperimentDecided", "AwaitingApproval"):
            assert r in reasons, reasons
        assert reasons.count("ExperimentStarted") == 1, reasons
        metrics = requests.get(f"{cluster.operator.url}/metrics", timeout=10).text
        assert 'vsearch_experiment_clicks{arm="candidate",name="better",namespace="vs"} 90.0' in metrics, metrics
        assert 'vsearch_experiment_decisions_total{decision="promote"} 1.0' in metrics

        for name, x in (("worse", worse), ("slow", slow)):
            st = cluster.wait_for(name, lambda s: s.get("phase") == "Failed" and not s.get("candidate"), 60,
                                  "Failed, candidate retired")["status"]
            assert st["reason"] == "ExperimentLost" and st["failed"]["reason"] == "ExperimentLost", st
            assert st["experiment"]["decision"] == "abort" and st["experiment"]["endedAt"], st["experiment"]
            assert "serving CTR" in st["message"] and "candidate CTR" in st["message"], st["message"]
            assert "1 keeps serving" in st["message"], st["message"]
            assert store.describe_alias(x["alias"]) == x["serving"].collection          # serving untouched
            assert prop(store, x["serving"].collection) == ""
            assert not store.has_collection(x["candidate"].collection)                  # retired
        assert "p99" in cluster.index("slow")["status"]["experiment"]["reason"]
        st = cluster.wait_for("bad", lambda s: s.get("reason") == "InvalidSpec", 30, "InvalidSpec")["status"]
        assert "spec.rollout.experiment.share: Invalid value: 0.7: should be less than or equal to 0.5" in st["message"]
        assert ("spec.rollout.experiment.design: Unsupported value: 'bandit': supported values: 'ab', 'interleave'"
                in st["message"]), st["message"]


class Properties:
    """The collection properties a step writes (the Milvus side is the end-to-end test's)."""

    def __init__(self):
        self.props: dict[tuple[str, str], str] = {}

    def set_collection_property(self, name, key, value):
        self.props[(name, key)] = value

    def has_collection(self, name):
        return True


def step_body(status: dict, experiment: dict) -> dict:
    obj = searchindex("t", bootstrap="127.0.0.1:1", topic="c", milvus_uri="http://127.0.0.1:2", alias="a",
                      model="m", version="2", uri="/models/2", requireApproval=True,
                      gate={"sampleSize": 0, "requireOfflineVerdict": False},
                      experiment={"enabled": True, "maxDurationSeconds": 600, **experiment})
    return {**obj, "metadata": {"name": "t", "namespace": "vs", "generation": 1}, "status": status}


def test_max_duration_applies_on_timeout_and_a_first_rollout_skips_the_experiment():
    v1, v2 = VersionRef.of("t", "vs", ModelRef("m", "1", "/models/1")), VersionRef.of("t", "vs", ModelRef("m", "2", "/models/2"))
    exp = {"id": "exp-00000000000000aa", "design": "ab", "share": 0.1, "salt": "0" * 32, "candidate": "2",
           "serving": "1", "servingCollection": v1.collection, "candidateCollection": v2.collection,
           "started": 1_000_000, "startedAt": "1970-01-01T00:16:40Z", "propertyWritten": True, "looks": 3}
    undecided = [decode(v) for _, v in search_events(exp, "serving", range(20), lambda i: [1] if i % 2 else [])
                 + search_events(exp, "candidate", range(20), lambda i: [1] if i % 2 else [])]
    status = {"phase": "Experimenting", "serving": v1.to_status(), "experiment": exp,
              "candidate": {**v2.to_status(), "embedderUrl": "http://127.0.0.1:9", "attempts": 0}}
    store = Properties()

    def look(at: float, st: dict, on_timeout: str):
        env = Env(workloads=None, store=store, groups=None, embedder=lambda url: None, fetcher=None,
                  query_fetcher=None, now=lambda: at, events=SimpleNamespace(read=lambda bootstrap, topic: undecided),
                  trust=Trust(milvus_hosts=("127.0.0.1",)))
        return reconcile("t", "vs", step_body(st, {"onTimeout": on_timeout}), env)

    out = look(1000 + 30, status, "promote")                              # within maxDuration: goes on
    assert out.phase == "Experimenting" and out.status["experiment"]["decision"] == "continue"
    assert out.status["experiment"]["looks"] == 4 and "timedOut" not in out.status["experiment"]
    assert json.loads(store.props[(v1.collection, EXPERIMENT_KEY)])["id"] == exp["id"]
    for on_timeout, phase in (("promote", "AwaitingApproval"), ("abort", "Failed")):
        out = look(1000 + 601, status, on_timeout)                       # maxDuration over: decided, persisted
        e = out.status["experiment"]
        assert out.phase == "Experimenting" and e["decision"] == on_timeout and e["timedOut"] is True, e
        assert "onTimeout=" + on_timeout in e["reason"] and not e.get("endedAt")
        out = look(1000 + 602, out.status, on_timeout)                    # then ended and acted on
        assert out.phase == phase and out.status["experiment"]["endedAt"], out.status
        assert store.props[(v1.collection, EXPERIMENT_KEY)] == ""
        assert ("timed out " + on_timeout) in out.status["message"]
    assert out.status["reason"] == "ExperimentLost" and "1 keeps serving" in out.status["message"]

    # the first version of an index: nothing serves to experiment against
    first = {"phase": "Verifying", "candidate": {**v2.to_status(), "embedderUrl": "http://127.0.0.1:9"}}
    out = look(5000, first, "abort")
    assert out.phase == "AwaitingApproval" and "no online experiment" in out.status["message"]
    assert "no version serves" in out.status["experiment"]["skipped"]
