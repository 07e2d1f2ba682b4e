"""The learning loop on the Kubernetes API the suite uses (``spec.training``): clicks on a real
``search.events`` topic make ``vsearch operator`` start a training run, as a Kubeflow Trainer v2
``TrainJob`` once the Trainer's CRD is registered, else as an indexed ``Job`` with its headless
Service; the test kubelet runs the run's nodes as real processes (``vsearch train-node`` ->
torchrun -> ``vsearch train --judge-against``), and the operator reads the trained model's
offline verdict and rolls out a winner (backfill, gate, switch), or stops with the verdict's
words for a loser. The objects are checked against their schemas (kubernetes-validate for the
built-in kinds, the Trainer's CRD for the TrainJob)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kafka import KafkaProducer

from tests.fixtures.catalog import publish
from tests.fixtures.cluster import searchindex
from tests.fixtures.operators import catalog_files, model_copy, unique, upsert_record, wrecked_whitening
from tests.fixtures.waiting import wait_until
from vsearch.core import search_events
from vsearch.operators.crd import InvalidSearchIndex, _to_jsonschema, validate
from vsearch.operators.pods import CONTAINER_SECURITY, POD_SECURITY
from vsearch.operators.spec import IndexSpec
from vsearch.operators.training import RDZV_PORT, Run, job_body, service_body, trainjob_body
from vsearch.predictor.model_dir import default_model_dir

SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "schemas"
TRAINJOB_CRD = SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml"
K8S_VERSION = "1.33"
OWNER = {"apiVersion": "vsearch.io/v1alpha1", "kind": "SearchIndex", "name": "shop", "uid": "u-1",
         "controller": True, "blockOwnerDeletion": True}


def trainjob_schema() -> dict:
    if not TRAINJOB_CRD.exists():
        pytest.skip(f"{TRAINJOB_CRD} is absent (the Kubeflow Trainer CRDs of ../shared/schemas)")
    crd = yaml.safe_load(TRAINJOB_CRD.read_text())
    return _to_jsonschema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def spec_of(**training) -> IndexSpec:
    return IndexSpec.from_dict({"catalog": {"bootstrap": "kafka-0.kafka:9092", "topic": "catalog.images"},
                                "milvus": {"uri": "http://milvus:19530"},
                                "model": {"name": "m", "version": "1", "uri": "s3://models/m/1"},
                                "training": {"enabled": True, "minNewClicks": 100,
                                             "modelUri": "s3://models/{index}/{version}", **training}},
                               namespace="vs", index="shop")


def test_the_job_its_service_and_the_trainjob_fit_their_schemas_with_the_workloads_hygiene():
    spec = spec_of(nodes=2, nprocPerNode=4, resources={"limits": {"nvidia.com/gpu": 4}},
                   recipe={"maxSteps": 300, "lr": 3e-4, "args": ["--temperature", "0.1"]},
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    run = Run("shop", "vs", "shop-t20261202215012-train", "t20261202215012", "m", "s3://models/shop/t20261202215012",
              "s3://models/m/1", "Job", "test", 1_764_700_000_000)
    job, svc = job_body(spec, run, OWNER), service_body(run, OWNER)
    for obj in (job, svc):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    pod = js["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= js["template"]["metadata"]["labels"].items()
    assert pod["securityContext"] == POD_SECURITY and pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["securityContext"] == CONTAINER_SECURITY and c["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/var/lib/vsearch", "/dev/shm"}
    assert job["metadata"]["ownerReferences"] == [OWNER] == svc["metadata"]["ownerReferences"]
    args = c["args"]
    torchrun = args[args.index("--") + 1:]
    assert torchrun[:11] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--node-rank",
                             "$(JOB_COMPLETION_INDEX)", "--master-addr", f"{run.job}-0.{run.service}",
                             "--master-port", str(RDZV_PORT)]
    train = torchrun[torchrun.index("vsearch") + 1:]
    assert train[0] == "train" and train[-2:] == ["--temperature", "0.1"]
    assert "--no-progress" in train
    rest = [a for a in train[1:] if a != "--no-progress"]
    flags = dict(zip(rest[::2], rest[1::2]))
    assert flags["--data"] == "kafka://kafka-0.kafka:9092/search.events" and flags["--judge-against"] == flags["--init"]
    assert (flags["--version"], flags["--max-steps"], flags["--lr"]) == (run.version, "300", "0.0003")
    assert args[args.index("--upload-to") + 1] == run.uri
    env = {e["name"]: e for e in c["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]

    tj = trainjob_body(spec, Run(**{**run.__dict__, "backend": "TrainJob"}), OWNER)
    errors = [e.message for e in jsonschema.Draft7Validator(trainjob_schema()).iter_errors(tj)]
    assert errors == [] and tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                                         "kind": "TrainingRuntime", "name": "vsearch-torch"}
    tr = tj["spec"]["trainer"]
    assert (tr["numNodes"], tr["numProcPerNode"], tr["resourcesPerNode"]) == (2, 4, {"limits": {"nvidia.com/gpu": 4}})
    # the runtime's torch plugin gives torchrun its rendezvous (PET_*): no flags of the Job's
    assert "--master-addr" not in tr["args"] and "--node-rank" not in tr["args"]


@pytest.mark.parametrize("training, message", [
    ({"schedule": "0 61 * * *"}, "spec.training.schedule: Invalid value: '0 61 * * *': hour: 61 is out of range 0-23"),
    ({"schedule": "every day"}, "spec.training.schedule: Invalid value: 'every day': should match"),
    ({"nodes": 0}, "spec.training.nodes: Invalid value: 0: should be greater than or equal to 1"),
    ({"modelUri": "s3://models/latest"}, "spec.training.modelUri: Invalid value: 's3://models/latest': should match"),
    ({"backend": "MPIJob"}, "spec.training.backend: Unsupported value: 'MPIJob'"),
    ({"modelUri": None}, "spec.training.modelUri: Required value"),
    ({"minNewClicks": None}, "spec.training: Invalid value: enabled training needs a trigger"),
])
def test_an_invalid_spec_training_is_refused_in_the_api_servers_words(training, message):
    body = {"enabled": True, "minNewClicks": 10, "modelUri": "/models/{version}", **training}
    body = {k: v for k, v in body.items() if v is not None}
    obj = {"spec": {"catalog": {"bootstrap": "k:9092"}, "milvus": {"uri": "http://m:19530"},
                    "model": {"name": "m", "version": "1", "uri": "/m"}, "training": body}}
    with pytest.raises((InvalidSearchIndex, ValueError)) as err:
        validate(obj)
        IndexSpec.from_dict(obj["spec"])
    assert message in str(err.value)


# --- end to end --------------------------------------------------------------------------------

def publish_clicks(broker: str, topic: str, items: list, start_ms: int, rounds: int = 1) -> int:
    """Each catalog photo searched with itself; the other photos of its class clicked (users of a
    good search): impressions and clicks as the search service writes them. Returns the clicks."""
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=20)
    n = clicks = 0
    for r in range(rounds):
        for q, (qid, qpath, qlabel) in enumerate(items):
            n += 1
            common = {"schema": 1, "query_id": f"r{start_ms}-{r}-{q}", "query_hash": f"h{qid}",
                      "query_uri": qpath.resolve().as_uri(), "crop": None, "model_version": "1", "ts": start_ms + n}
            others = [(i, p, lbl) for i, p, lbl in items if i != qid]
            results = [{"id": i, "rank": k + 1, "score": 1.0 - k / 20, "uri": p.resolve().as_uri()}
                       for k, (i, p, _) in enumerate(others)]
            recs = [{**common, "type": "impression", "results": results}]
            recs += [{**common, "type": "click", "item_id": i, "item_uri": p.resolve().as_uri(),
                      "rank": next(x["rank"] for x in results if x["id"] == i)}
                     for i, p, lbl in others if lbl == qlabel]
            for rec in recs:
                producer.send(topic, key=rec["query_id"].encode(), value=search_events.encode(rec))
            clicks += len(recs) - 1
    producer.flush()
    producer.close()
    return clicks


def last_run(st: dict) -> dict:
    return ((st.get("training") or {}).get("runs") or [{}])[-1]


@pytest.mark.timeout(600)
def test_clicks_train_on_the_cluster_a_winner_is_rolled_out_and_a_loser_stops_with_the_reason(
        tmp_path, cluster, broker, milvus_server_uri):
    topic, events, alias, name = unique("catalog-tr-"), unique("events-tr-"), unique("tr_"), "shop"
    items = catalog_files(tmp_path / "photos", n_classes=4, per_class=4)
    publish(broker, topic, [upsert_record(i, p, lbl, 1_700_000_000_000 + n) for n, (i, p, lbl) in enumerate(items)])
    serving = model_copy(default_model_dir(), tmp_path / "serving", "1")
    wrecked_whitening(serving)
    models = tmp_path / "models"
    trainer_crd = TRAINJOB_CRD.exists()
    if trainer_crd:           # the Kubeflow Trainer "installed": its TrainJob is served from now on
        cluster.api.create("customresourcedefinitions", yaml.safe_load(TRAINJOB_CRD.read_text()))
    cluster.start_operator(allow={"--model-file-roots": str(tmp_path)})
    obj = searchindex(name, bootstrap=broker, topic=topic, milvus_uri=milvus_server_uri, alias=alias,
                      model="vsearch-default", version="1", uri=str(serving))
    obj["spec"]["training"] = {"enabled": True, "minNewClicks": 20, "eventsTopic": events,
                               "modelUri": f"{models}/{{index}}-{{version}}", "image": "vsearch:test",
                               "recipe": {"maxSteps": 2, "batchSize": 8, "lr": 1e-6, "holdout": 0.5}}
    cluster.api.create("searchindexes", obj)
    # an invalid spec.training is refused with the API server's words, nothing created for it
    bad = searchindex("bad", bootstrap=broker, topic=topic, milvus_uri=milvus_server_uri, alias=unique("b_"),
                      model="m", version="1", uri=str(serving))
    bad["spec"]["training"] = {"enabled": True, "schedule": "0 25 * * *", "modelUri": "/m/{version}"}
    cluster.api.create("searchindexes", bad)
    cluster.wait_phase(name, "Ready", 180, version="1")
    t0 = time.time()
    st = cluster.wait_for(name, lambda s: (s.get("training") or {}).get("newClicks") is not None, 30,
                          "the loop counting clicks")["status"]
    assert st["training"]["state"] == "Idle" and "0 of 20 new clicks" in st["training"]["message"], st["training"]
    bad_st = cluster.wait_for("bad", lambda s: s.get("reason") == "InvalidSpec", 30, "InvalidSpec")["status"]
    assert "spec.training.schedule: Invalid value: '0 25 * * *': hour: 25 is out of range 0-23" in bad_st["message"]

    # users click: a run starts (a TrainJob: the Trainer's CRD is there), trains, wins, is rolled out
    assert publish_clicks(broker, events, items, int(time.time() * 1000)) >= 20
    st = cluster.wait_for(name, lambda s: (s.get("training") or {}).get("current"), 60, "a training run")["status"]
    run = st["training"]["current"]
    kind = "trainjobs" if trainer_crd else "jobs"
    assert run["backend"] == ("TrainJob" if trainer_crd else "Job") and "new clicks" in run["trigger"]
    wait_until(lambda: cluster.api.get(kind, run["job"]), 30, 0.2, f"{kind}/{run['job']}")
    made = cluster.api.get(kind, run["job"])
    assert made["metadata"]["ownerReferences"][0]["name"] == name
    if trainer_crd:
        assert [e.message for e in jsonschema.Draft7Validator(trainjob_schema()).iter_errors(made)] == []
    st = cluster.wait_for(name, lambda s: last_run(s).get("result") not in (None, "Trained"), 240,
                          f"{run['version']} rolled out")["status"]
    won = last_run(st)
    assert won["result"] == "RolledOut" and st["serving"]["version"] == run["version"], (won, st.get("message"))
    assert st["serving"]["modelUri"] == f"{models}/{name}-{run['version']}" and st["previous"]["version"] == "1"
    assert "beats serving vsearch-default:1" in won["reason"] and won["figures"]["against"]
    assert st["training"]["target"]["version"] == run["version"] and st["training"]["state"] == "Idle"
    assert json.loads((models / f"{name}-{run['version']}" / "vsearch_model.json").read_text())["version"] == run["version"]
    took = time.time() - t0

    # a recipe that wrecks the model (lr 0.5), as a plain indexed Job of 2 pods (torchrun's static
    # rendezvous on pod 0): it loses offline and is not rolled out
    cluster.api.patch("searchindexes", name, {"spec": {"training": {"backend": "Job", "nodes": 2,
                                                                     "recipe": {"lr": 0.5}}}})
    publish_clicks(broker, events, items, int(time.time() * 1000))
    st = cluster.wait_for(name, lambda s: last_run(s).get("version") not in (None, run["version"])
                          and last_run(s).get("result"), 240, "the second run's result")["status"]
    lost = last_run(st)
    assert lost["backend"] == "Job" and cluster.api.get("services", lost["job"]) is not None
    job = cluster.api.get("jobs", lost["job"])
    assert job["spec"]["completionMode"] == "Indexed" and job["status"]["succeeded"] == 2 == job["spec"]["completions"]
    assert cluster.kubelet.starts[lost["job"]] == 2
    assert lost["result"] == "NotBetter", lost
    # it trained on the clicks after the run that made the serving version started
    assert lost["clicksSinceMs"] == won["startedMs"] > 0 and won["clicksSinceMs"] == 0
    assert lost["reason"].startswith("not rolled out: ") and "DOES NOT BEAT serving vsearch-default:" in lost["reason"]
    assert st["serving"]["version"] == run["version"] and st["phase"] == "Ready" and not st.get("candidate")
    assert "TrainingNotRolledOut" in [e.get("reason") for e in cluster.events(name)]
    print(f"first turn (clicks -> trained version serving): {took:.0f}s")


# --- pieces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, after, expected", [
    ("*/15 2 * * mon-fri", "2026-12-05T00:00", "2026-12-07T02:00"),      # a Saturday: Monday 02:00
    ("@monthly", "2026-12-05T00:00", "2027-01-01T00:00"),
    ("0 0 29 2 *", "2026-12-05T00:00", "2028-02-29T00:00"),
    ("30 4 1,15 * 5", "2026-12-02T00:00", "2026-12-04T04:30"),             # day of month OR Friday
    ("0 3 * * 7", "2026-12-02T00:00", "2026-12-06T03:00"),                # 7 is Sunday
])
def test_the_schedule_names_the_next_time_as_cron_does(expr, after, expected):
    from datetime import datetime, timezone

    from vsearch.operators.cron import Cron

    def ts(text):
        return datetime.strptime(text, "%Y-%m-%dT%H:%M").replace(tzinfo=timezone.utc).timestamp()
    assert Cron.parse(expr).next_after(ts(after)) == ts(expected)


def test_the_training_target_leads_until_a_person_changes_spec_model():
    from vsearch.operators.training import desired_model

    spec = spec_of()
    target = {"model": "m", "version": "t1", "uri": "s3://models/shop/t1", "specKey": spec.model.key}
    assert desired_model(spec, {"training": {"target": target}}).version == "t1"
    assert desired_model(spec, {}) == spec.model
    moved = IndexSpec.from_dict({**{"catalog": {"bootstrap": "k:9092"}, "milvus": {"uri": "http://m:19530"}},
                                 "model": {"name": "m", "version": "2", "uri": "s3://models/m/2"}})
    assert desired_model(moved, {"training": {"target": target}}) == moved.model


def test_only_a_verdict_that_beats_the_serving_model_too_is_rolled_out():
    from vsearch.operators.training import judge

    def meta(**beats):
        against = {name: {"kind": kind, "beats": beats.get(kind, True),
                          "metrics": {"mrr": {"model": 0.5, "reference": 0.4}}}
                   for name, kind in (("serving m:1", "serving"), ("raw-pixels 32x32", "raw-pixels"))}
        text = "\n".join(f"m:2 {'beats' if a['beats'] else 'DOES NOT BEAT'} {n} (mrr 0.5 vs 0.4)" for n, a in against.items())
        return {"name": "m", "version": "2", "evaluation": {"metrics": {"mrr": 0.5}, "verdict": {
            "metrics": ["mrr"], "beats_all": all(a["beats"] for a in against.values()), "against": against,
            "text": text}}}
    ok, why, figures = judge(meta())
    assert ok and "beats serving m:1" in why and figures["against"]["serving m:1"]["mrr"]["reference"] == 0.4
    ok, why, _ = judge(meta(serving=False))
    assert not ok and why == "m:2 DOES NOT BEAT serving m:1 (mrr 0.5 vs 0.4)"
    no_serving = meta()
    del no_serving["evaluation"]["verdict"]["against"]["serving m:1"]
    assert judge(no_serving)[1] == "m:2's offline verdict does not judge it against the serving model"
    assert "carries no offline verdict" in judge({"name": "m", "version": "2"})[1]


def test_a_schedule_trains_once_per_time_it_names():
    """The loop's decision on a step's spec, status and clock (a schedule alone reads no events)."""
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from vsearch.operators.training import Loop

    def at(text):
        return datetime.strptime(text, "%Y-%m-%dT%H:%M").replace(tzinfo=timezone.utc).timestamp()
    spec = spec_of(schedule="0 3 * * *", minNewClicks=None, backend="Job")
    events = []
    step = SimpleNamespace(spec=spec, now=at("2026-12-02T01:00"), name="shop", namespace="vs",
                           event=lambda *e: events.append(e),
                           status={"serving": {"model": "m", "version": "1", "modelUri": "s3://models/m/1",
                                               "since": "2026-12-01T00:00:00Z"}})
    Loop(step).look()
    tr = step.status["training"]
    assert tr["nextScheduleAt"] == "2026-12-02T03:00:00Z" and not tr.get("current") and not events
    step.now = at("2026-12-02T03:00")
    Loop(step).look()
    tr = step.status["training"]
    run = tr["current"]
    assert run["trigger"] == "schedule '0 3 * * *'" and run["version"] == "t20261202030000"
    assert run["modelUri"] == "s3://models/shop/t20261202030000" and run["initUri"] == "s3://models/m/1"
    assert tr["nextScheduleAt"] == "2026-12-03T03:00:00Z" and tr["state"] == "Training"
    assert [e[1] for e in events] == ["TrainingStarted"] and tr["runs"][-1]["servingVersion"] == "1"
    assert run["clicksSinceMs"] == 0          # the serving "1" is a person's: every click is new to it


def test_a_run_trains_on_the_clicks_since_the_serving_version_was_trained():
    """The serving version trained by a run of the loop: the next run's pairs are the clicks
    after that run started (its log was read from then on); a person's model: all of them."""
    from types import SimpleNamespace

    from vsearch.operators.training import Loop, train_args

    spec = spec_of()

    def window(status):
        return Loop(SimpleNamespace(spec=spec, now=1_800_000_000.0, name="shop", namespace="vs",
                                    event=lambda *e: None, status=status)).clicks_window_ms()
    serving = {"model": "m", "version": "t2", "modelUri": "s3://models/shop/t2", "since": "2026-12-02T05:00:00Z"}
    runs = [{"version": "t1", "startedMs": 1_000, "result": "NotBetter"},
            {"version": "t2", "startedMs": 2_000, "result": "RolledOut"},
            {"version": "t3", "startedMs": 3_000, "result": "NotBetter"}]
    assert window({"serving": serving, "training": {"runs": runs}}) == 2_000
    # its run gone from the history: the target it was rolled out as remembers
    target = {"model": "m", "version": "t2", "uri": "s3://models/shop/t2", "trainedFromMs": 2_000}
    assert window({"serving": serving, "training": {"runs": runs[2:], "target": target}}) == 2_000
    assert window({"serving": {**serving, "version": "1"}, "training": {"runs": runs}}) == 0
    run = Run("shop", "vs", "shop-t4-train", "t4", "m", "s3://models/shop/t4", "s3://models/shop/t2", "Job",
              "test", 4_000, clicks_since_ms=2_000)
    args = train_args(spec, run)
    assert args[args.index("--clicks-since-ms") + 1] == "2000"
    assert Run.from_status("shop", "vs", run.to_status()) == run
    assert "--clicks-since-ms" not in train_args(spec, Run(**{**run.__dict__, "clicks_since_ms": 0}))
