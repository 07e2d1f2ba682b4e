"""``vsearch demo --rollout MODEL_DIR``: once the demo's catalog is searchable, roll MODEL_DIR out
blue-green through the operator's own rollout logic (:mod:`vsearch.operators.rollout`) on local processes
(:class:`vsearch.local.workloads.LocalWorkloads`): its embedder, its collection, its ingest
consumer replaying the catalog topic, the quality gate, one alias switch, while the web page
keeps answering.

``--experiment ab|interleave``: after the gate, the rollout's ``Experimenting`` phase runs an
online experiment between the serving version and the new one on the demo's search service
(half of the users: ``share`` 0.5, the most the CRD allows), decided by the operator's own
analysis of the search events; ``--simulate-users N``: N simulated users
(:class:`vsearch.local.simusers.SimulatedUsers`, a position-based click model, relevant = same
label) search and click meanwhile, in rounds, until the experiment decides.

Exit codes (with ``--check``): 0 the new version serves, 3 the gate refused it (blue still
serving), 4 the experiment (or a guardrail) decided against it (blue still serving), 1 any
other error."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from ..core.config import csv_list
from ..core.store import DEFAULT_ALIAS
from ..operators.experiments import summary
from ..operators.rollout import EXPERIMENTING, FAILED, READY, iso
from ..operators.trust import Trust
from ..predictor.model_dir import read_meta
from .simusers import SimulatedUsers
from .workloads import LocalRollout, LocalWorkloads

GATE_REFUSED = 3
EXPERIMENT_LOST = 4
# the demo's experiment: half of the users, decided within minutes
DEMO_EXPERIMENT = {"share": 0.5, "alpha": 0.05, "maxDurationSeconds": 900, "onTimeout": "abort"}


def rollout_spec(*, bootstrap: str, milvus_uri: str, alias: str, name: str, version: str, uri: str,
                 golden: str | None = None, idle_s: float = 3.0, sample: int = 50,
                 batch_size: int = 256, experiment: dict | None = None) -> dict:
    gate: dict = {"sampleSize": sample}
    if golden:                  # the CSV's text goes into the local ConfigMap "golden" (run_rollout)
        gate["golden"] = {"configMapRef": {"name": "golden"}, "margin": 0.02}
    rollout = {"retentionSeconds": 3600, "backfill": {"idleSeconds": idle_s}, "gate": gate}
    if experiment:
        rollout["experiment"] = {"enabled": True, **experiment}
    return {"catalog": {"bootstrap": bootstrap, "topic": "catalog.images"},
            "milvus": {"uri": milvus_uri, "alias": alias, "index": {"type": "HNSW"}},
            "model": {"name": name, "version": version, "uri": uri},
            "ingest": {"batchSize": batch_size},
            "rollout": rollout}


def demo_experiment(design: str, users: int) -> dict:
    """``spec.rollout.experiment`` of the demo: no decision before ``minUnits`` units (A/B: the
    users seen, half of the simulated ones, at most 200; interleave: queries with a preference)."""
    min_units = max(20, min(200, users // 2)) if design == "ab" and users else 200
    return {**DEMO_EXPERIMENT, "design": design, "minUnits": min_units}


class UserRounds(threading.Thread):
    """Simulated users searching and clicking in rounds while the experiment runs (started
    once the search services were told of it: ``status.experiment.propertyWritten``)."""

    def __init__(self, users: SimulatedUsers, *, per_round: int, max_sessions: int):
        super().__init__(name="simulated-users", daemon=True)
        self.users, self.per_round, self.max_sessions = users, per_round, max_sessions
        self.stop_evt = threading.Event()
        self.sessions = self.errors = self.clicks = 0
        self.by_arm: dict[str, dict] = {}
        self.first_errors: list[str] = []

    def run(self) -> None:
        while not self.stop_evt.is_set() and self.sessions < self.max_sessions:
            out = self.users.run(min(self.per_round, self.max_sessions - self.sessions), start=self.sessions,
                                 workers=4)
            self.sessions += out["sessions"]
            self.errors += out["errors"]
            self.clicks += out["clicks"]
            self.first_errors = (self.first_errors + out["first_errors"])[:5]
            for arm, figures in out["by_arm"].items():
                have = self.by_arm.setdefault(arm, {k: 0 for k in figures})
                for k, v in figures.items():
                    have[k] = have.get(k, 0) + v

    def stop(self) -> None:
        self.stop_evt.set()
        self.join(120)


def serving_status(*, model: str, version: str, uri: str, collection: str, group: str, embedder_url: str) -> dict:
    """Status of a SearchIndex that adopts the version the demo already serves."""
    return {"phase": "Ready", "serving": {"model": model, "version": version, "modelUri": uri,
                                          "collection": collection, "consumerGroup": group,
                                          "embedderUrl": embedder_url, "since": iso(time.time())}}


def run_rollout(*, model_dir: str, bootstrap: str, milvus_uri: str, serving: dict, search_url: str,
                log_dir: Path, golden: str | None = None, timeout: float = 600, keep=None,
                file_roots: str = "", experiment: str | None = None, simulate_users: int = 0,
                items: list[dict] | None = None) -> int:
    meta = read_meta(model_dir)
    cur = serving["serving"]
    version = meta.version if (meta.name, meta.version) != (cur["model"], cur["version"]) else f"{meta.version}-b"
    print(f"\nrolling out {meta.name} version {version} ({meta.family}, {meta.embedding_dim}-d) from {model_dir}; "
          f"serving: {cur['model']} {cur['version']} ({cur['collection']})", flush=True)
    spec = rollout_spec(bootstrap=bootstrap, milvus_uri=milvus_uri, alias=DEFAULT_ALIAS, name=cur["model"],
                        version=cur["version"], uri=cur["modelUri"], golden=golden,
                        experiment=demo_experiment(experiment, simulate_users) if experiment else None)
    # the catalog's file:// images may be read from file_roots (ingest and the gate read none by default)
    golden_maps = {"golden": {"judgments.csv": Path(golden).read_text()}} if golden else {}
    workloads = LocalWorkloads(log_dir, ingest_extra=("--batch-ms", "200", "--file-roots", file_roots),
                               config_maps=golden_maps)
    if keep is not None:
        keep.append(workloads)
    # The demo prints each phase once, itself: the operator's and the store's INFO lines would
    # say it again.
    for name in ("vsearch.operators.rollout", "vsearch.core.store"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trust = Trust(milvus_hosts=("127.0.0.1", "localhost"), catalog_file_roots=tuple(csv_list(file_roots)))
    ro = LocalRollout(spec, workloads, status=serving, trust=trust)
    rounds: UserRounds | None = None
    if experiment and simulate_users:
        rounds = UserRounds(SimulatedUsers(search_url, items or [], n_users=simulate_users, seed=1),
                            per_round=max(20, min(200, simulate_users // 2)), max_sessions=200 * simulate_users)
    elif experiment:
        print(f"  no simulated users: the experiment waits for clicks on the web page ({search_url}/), "
              f"at most {DEMO_EXPERIMENT['maxDurationSeconds']}s", flush=True)

    def users_follow(out) -> None:
        """Start the simulated users once the experiment is on; stop them once it is decided."""
        e = out.status.get("experiment") or {}
        if rounds is not None and not rounds.is_alive() and not rounds.stop_evt.is_set() \
                and out.phase == EXPERIMENTING and e.get("propertyWritten"):
            print(f"  {simulate_users} simulated users start searching and clicking", flush=True)
            rounds.start()
        if rounds is not None and rounds.is_alive() and (out.phase != EXPERIMENTING or e.get("decision") in
                                                         ("promote", "abort")):
            rounds.stop()
        msg = out.status.get("message")
        if out.phase in ("Backfilling", EXPERIMENTING) and msg not in (said["msg"], ro._said) \
                and time.monotonic() - said["at"] >= (10 if out.phase == EXPERIMENTING else 5):
            print(f"    {msg}", flush=True)
            said.update(msg=msg, at=time.monotonic())

    said = {"msg": None, "at": 0.0}

    try:
        ro.step()                                          # adopt what serves
        ro.set_model(meta.name, version, str(Path(model_dir).resolve()))
        t0 = time.monotonic()
        out = ro.run_until(lambda s: s.get("phase") in (READY, FAILED) and not s.get("candidate")
                           and ((s.get("serving") or {}).get("version") == version or s.get("phase") == FAILED),
                           timeout + (DEMO_EXPERIMENT["maxDurationSeconds"] if experiment else 0),
                           on_tick=users_follow if experiment else None)
    finally:
        if rounds is not None and rounds.is_alive():
            rounds.stop()
        ro.close()
    st = out.status
    gate = st.get("gate") or {}
    print(f"gate: {gate.get('verdict')} {json.dumps({k: gate.get(k) for k in ('selfConsistency', 'golden', 'offline') if gate.get(k)})}")
    e = st.get("experiment") or {}
    if e.get("id"):
        print(f"experiment {e['id']} ({e.get('design')}): {e.get('decision')} after {e.get('looks')} looks: "
              f"{e.get('reason')}\n  {summary(e)}", flush=True)
        if rounds is not None:
            print(f"  simulated users: {rounds.sessions} sessions, {rounds.clicks} clicks, {rounds.errors} errors; "
                  f"by arm {json.dumps(rounds.by_arm)}" + (f"; e.g. {rounds.first_errors[0]}" if rounds.first_errors
                                                           else ""), flush=True)
    if st["phase"] == FAILED:
        print(f"rollout refused: {st.get('message')}; {cur['version']} still serves", flush=True)
        return {"GateFailed": GATE_REFUSED, "ExperimentLost": EXPERIMENT_LOST}.get(st.get("reason"), 1)
    print(f"{version} serves after {time.monotonic() - t0:.1f}s: alias images -> {st['serving']['collection']}",
          flush=True)
    return 0
