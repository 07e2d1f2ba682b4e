"""``vsearch demo --rollout MODEL_DIR``: once the demo's catalog is searchable, roll MODEL_DIR out
blue-green through the operator's own rollout logic (:mod:`vsearch.operators.rollout`) on local processes
(:class:`vsearch.local.workloads.LocalWorkloads`): its embedder, its collection, its ingest
consumer replaying the catalog topic, the quality gate, one alias switch, while the web page
keeps answering. Exit codes (with ``--check``): 0 the new version serves, 3 the gate refused it
(blue still serving), 1 any other error."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..core.config import csv_list
from ..core.store import DEFAULT_ALIAS
from ..operators.rollout import FAILED, READY, iso
from ..operators.trust import Trust
from ..predictor.model_dir import read_meta
from .workloads import LocalRollout, LocalWorkloads

GATE_REFUSED = 3


def rollout_spec(*, bootstrap: str, milvus_uri: str, alias: str, name: str, version: str, uri: str,
                 golden: str | None = None, idle_s: float = 3.0, sample: int = 50,
                 batch_size: int = 256) -> dict:
    gate: dict = {"sampleSize": sample}
    if golden:                  # the CSV's text goes into the local ConfigMap "golden" (run_rollout)
        gate["golden"] = {"configMapRef": {"name": "golden"}, "margin": 0.02}
    return {"catalog": {"bootstrap": bootstrap, "topic": "catalog.images"},
            "milvus": {"uri": milvus_uri, "alias": alias, "index": {"type": "HNSW"}},
            "model": {"name": name, "version": version, "uri": uri},
            "ingest": {"batchSize": batch_size},
            "rollout": {"retentionSeconds": 3600, "backfill": {"idleSeconds": idle_s}, "gate": gate}}


def serving_status(*, model: str, version: str, uri: str, collection: str, group: str, embedder_url: str) -> dict:
    """Status of a SearchIndex that adopts the version the demo already serves."""
    return {"phase": "Ready", "serving": {"model": model, "version": version, "modelUri": uri,
                                          "collection": collection, "consumerGroup": group,
                                          "embedderUrl": embedder_url, "since": iso(time.time())}}


def run_rollout(*, model_dir: str, bootstrap: str, milvus_uri: str, serving: dict, search_url: str,
                log_dir: Path, golden: str | None = None, timeout: float = 600, keep=None,
                file_roots: str = "") -> int:
    meta = read_meta(model_dir)
    cur = serving["serving"]
    version = meta.version if (meta.name, meta.version) != (cur["model"], cur["version"]) else f"{meta.version}-b"
    print(f"\nrolling out {meta.name} version {version} ({meta.family}, {meta.embedding_dim}-d) from {model_dir}; "
          f"serving: {cur['model']} {cur['version']} ({cur['collection']})", flush=True)
    spec = rollout_spec(bootstrap=bootstrap, milvus_uri=milvus_uri, alias=DEFAULT_ALIAS, name=cur["model"],
                        version=cur["version"], uri=cur["modelUri"], golden=golden)
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
    try:
        ro.step()                                          # adopt what serves
        ro.set_model(meta.name, version, str(Path(model_dir).resolve()))
        t0 = time.monotonic()
        out = ro.run_until(lambda s: s.get("phase") in (READY, FAILED) and not s.get("candidate")
                           and ((s.get("serving") or {}).get("version") == version or s.get("phase") == FAILED),
                           timeout)
    finally:
        ro.close()
    st = out.status
    gate = st.get("gate") or {}
    print(f"gate: {gate.get('verdict')} {json.dumps({k: gate.get(k) for k in ('selfConsistency', 'golden', 'offline') if gate.get(k)})}")
    if st["phase"] == FAILED:
        print(f"rollout refused: {st.get('message')}; {cur['version']} still serves", flush=True)
        return GATE_REFUSED if st.get("reason") == "GateFailed" else 1
    print(f"{version} serves after {time.monotonic() - t0:.1f}s: alias images -> {st['serving']['collection']}",
          flush=True)
    return 0
