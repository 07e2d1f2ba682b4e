"""The CRD: its OpenAPI schema accepts the documented objects and refuses bad ones with the
messages a person sees from ``kubectl apply``; the typed spec's defaults are the schema's."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vsearch.operators import crd
from vsearch.operators.spec import Gate, IndexSpec, Policy, Workload

GOOD = {"apiVersion": "vsearch.io/v1alpha1", "kind": "SearchIndex", "metadata": {"name": "shop"},
        "spec": {"catalog": {"bootstrap": "kafka:9092", "topic": "catalog.images"},
                 "milvus": {"uri": "http://milvus:19530", "tokenSecretRef": {"name": "milvus"},
                            "index": {"type": "DISKANN", "params": {}}},
                 "model": {"name": "resnet-tiny", "version": "2", "uri": "s3://models/resnet-tiny/2"},
                 "embedder": {"image": "vsearch:0.1", "replicas": 2, "nodeSelector": {"gpu": "yes"},
                              "tolerations": [{"key": "gpu", "operator": "Exists"}],
                              "resources": {"limits": {"cpu": "2"}}},
                 "ingest": {"image": "vsearch:0.1", "batchSize": 128},
                 "rollout": {"requireApproval": True, "retentionSeconds": 3600,
                             "backfill": {"idleSeconds": 30},
                             "gate": {"sampleSize": 100, "golden": {"configMapRef": {"name": "golden"},
                                                                     "margin": 0.01}}}}}


def bad(path: str, value):
    obj = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node.setdefault(p, {})
    if value is KeyError:
        node.pop(last)
    else:
        node[last] = value
    return obj


def test_the_documented_object_is_valid_and_printer_columns_are_declared():
    crd.validate(GOOD)
    version = crd.crd()["spec"]["versions"][0]
    assert crd.crd()["metadata"]["name"] == "searchindexes.vsearch.io" and version["name"] == "v1alpha1"
    assert crd.crd()["spec"]["scope"] == "Namespaced" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Serving", "Candidate", "Phase", "Training", "Age"]


@pytest.mark.parametrize("path,value,message", [
    ("spec.model.version", KeyError, "spec.model.version: Required value"),
    ("spec.catalog", KeyError, "spec.catalog: Required value"),
    ("spec.milvus.index.type", "ANNOY", "spec.milvus.index.type: Unsupported value: 'ANNOY': supported values: "
                                        "'HNSW', 'DISKANN', 'IVF_FLAT', 'IVF_SQ8', 'IVF_PQ', 'FLAT', 'AUTOINDEX'"),
    ("spec.embedder.replicas", 101, "spec.embedder.replicas: Invalid value: 101: should be less than or equal to 100"),
    ("spec.rollout.retentionSeconds", -1, "spec.rollout.retentionSeconds: Invalid value: -1: should be greater"),
    ("spec.rollout.gate.golden.margin", 2, "spec.rollout.gate.golden.margin: Invalid value: 2"),
    ("spec.model.uri", "ftp://x", "spec.model.uri: Invalid value: 'ftp://x': should match"),
    ("spec.milvus.uri", "milvus:19530", "spec.milvus.uri: Invalid value: 'milvus:19530'"),
    ("spec.catalog.bootstrap", "kafka", "spec.catalog.bootstrap: Invalid value: 'kafka'"),
    ("spec.rollout.requireApproval", "yes", "spec.rollout.requireApproval: Invalid value: 'yes': must be of type boolean"),
    ("spec.embedder.runtimeClassName", "Nvidia GPU", "spec.embedder.runtimeClassName: Invalid value: 'Nvidia GPU': should match"),
    ("spec.ingest.imagePullSecrets", [{"secret": "x"}], "spec.ingest.imagePullSecrets[0].name: Required value"),
    ("spec.rollout.gate.requireOfflineVerdict", "yes",
     "spec.rollout.gate.requireOfflineVerdict: Invalid value: 'yes': must be of type boolean"),
    ("spec.rollout.experiment.share", 0, "spec.rollout.experiment.share: Invalid value: 0: should be greater than 0"),
    ("spec.rollout.experiment.share", 0.6,
     "spec.rollout.experiment.share: Invalid value: 0.6: should be less than or equal to 0.5"),
    ("spec.rollout.experiment.alpha", 0.5, "spec.rollout.experiment.alpha: Invalid value: 0.5: should be less than 0.5"),
    ("spec.rollout.experiment.design", "bandit", "spec.rollout.experiment.design: Unsupported value: 'bandit': "
                                                 "supported values: 'ab', 'interleave'"),
])
def test_invalid_objects_are_refused_with_a_clear_message(path, value, message):
    with pytest.raises(crd.InvalidSearchIndex) as err:
        crd.validate(bad(path, value))
    assert any(e.startswith(message) for e in err.value.errors), err.value.errors


def test_the_typed_spec_defaults_are_the_schemas():
    spec = IndexSpec.from_dict({"catalog": {"bootstrap": "k:1"}, "milvus": {"uri": "http://m:1"},
                                "model": {"name": "m", "version": "1", "uri": "/m"}})
    props = crd.schema()["properties"]["spec"]["properties"]
    ro = props["rollout"]["properties"]
    assert spec.topic == props["catalog"]["properties"]["topic"]["default"]
    assert "default" not in props["milvus"]["properties"]["alias"]        # derived per index, below
    assert spec.index_type == props["milvus"]["properties"]["index"]["properties"]["type"]["default"]
    assert spec.policy.retention_s == ro["retentionSeconds"]["default"]
    assert spec.policy.max_retries == ro["maxRetries"]["default"]
    assert spec.policy.require_approval == ro["requireApproval"]["default"]
    assert spec.policy.idle_s == ro["backfill"]["properties"]["idleSeconds"]["default"]
    assert spec.policy.gate.sample_size == ro["gate"]["properties"]["sampleSize"]["default"]
    assert spec.policy.gate.min_self_score == ro["gate"]["properties"]["minSelfScore"]["default"]
    assert spec.policy.gate.require_offline_verdict is ro["gate"]["properties"]["requireOfflineVerdict"]["default"] is True
    assert spec.ingest.batch_size == props["ingest"]["properties"]["batchSize"]["default"]


def test_the_readmes_searchindex_is_valid_and_reads_as_written():
    """The annotated example in the README's "The SearchIndex resource" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "kind: SearchIndex" in b
                and "catalog:" in b and "rollout:" in b]
    obj = yaml.safe_load(block)
    crd.validate(obj)
    spec = IndexSpec.from_dict(obj["spec"])
    assert spec.embedder.service_account == "vsearch-models" and spec.embedder.runtime_class == "nvidia"
    assert spec.embedder.image_pull_secrets == [{"name": "registry-credentials"}]
    assert spec.policy.gate.require_offline_verdict is False and spec.policy.gate.golden.margin == 0.02


def test_the_schema_is_structural_so_unknown_fields_are_pruned_like_the_api_server_does():
    """A real API server refuses a CRD with additionalProperties beside properties; with a
    structural schema it prunes undeclared fields (kubectl's strict validation refuses them,
    naming them as unknown_fields does). The operator reads the pruned object, never the field."""
    def walk(node, path):
        if isinstance(node, dict):
            assert not ("properties" in node and "additionalProperties" in node), path
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
            for k, v in (node.get("properties") or {}).items():
                walk(v, f"{path}.{k}")
            for k in ("items", "additionalProperties"):
                if isinstance(node.get(k), dict):
                    walk(node[k], f"{path}.{k}")
    walk(crd.schema(), "openAPIV3Schema")
    root = Path(__file__).resolve().parents[2]
    # the project's offline structural-schema check (the stop hook runs it too), where the checkout has it
    tool = next((p for p in (root.parent / "shared", root.parents[1] / "shared", Path("/work/shared"))
                 if (p / "tools" / "check-crds.py").exists()), None)
    if tool is not None:
        run = subprocess.run([sys.executable, str(tool / "tools" / "check-crds.py"), "operators/searchindex.yaml",
                              "charts/vsearch/crds/searchindex.yaml"], cwd=root, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr

    obj = bad("spec.model.colour", "blue")
    obj["spec"]["rollout"]["gate"]["golden"]["configMapRef"]["extra"] = 1
    obj["spec"]["milvus"]["index"]["params"] = {"M": 16, "anything": "kept"}      # preserve-unknown-fields
    crd.validate(obj)                                      # accepted, as fieldValidation=Warn accepts it
    assert crd.unknown_fields(obj) == ["spec.model.colour", "spec.rollout.gate.golden.configMapRef.extra"]
    pruned = crd.prune(obj)
    assert "colour" not in pruned["spec"]["model"] and "extra" not in pruned["spec"]["rollout"]["gate"]["golden"]["configMapRef"]
    assert pruned["spec"]["milvus"]["index"]["params"] == {"M": 16, "anything": "kept"}
    assert pruned["metadata"] == obj["metadata"] and crd.unknown_fields(pruned) == []


def test_the_default_alias_is_per_index():
    one = IndexSpec.from_dict(GOOD["spec"] | {"milvus": {"uri": "http://m:1"}}, namespace="team-a", index="shop")
    two = IndexSpec.from_dict(GOOD["spec"] | {"milvus": {"uri": "http://m:1"}}, namespace="team-b", index="shop")
    assert one.alias.startswith("vs_team_a_shop_") and one.alias != two.alias and one.alias != "images"
    assert IndexSpec.from_dict(GOOD["spec"] | {"milvus": {"uri": "http://m:1", "alias": "images"}},
                               namespace="x", index="y").alias == "images"


def test_the_schema_is_the_one_home_of_the_defaults():
    """The typed spec reads objects defaulted by the schema (as the API server stores them): a
    minimal object and one with every default written out read the same, and the dataclasses'
    own defaults are the schema's."""
    minimal = {"catalog": {"bootstrap": "k:1"}, "milvus": {"uri": "http://m:1"},
               "model": {"name": "m", "version": "1", "uri": "/m"}}
    full = crd.apply_defaults({"spec": minimal})["spec"]
    assert full["rollout"]["gate"]["requireOfflineVerdict"] is True and full["ingest"]["batchSize"] == 256
    assert full["milvus"]["index"] == {"type": "HNSW", "metric": "COSINE"} and "alias" not in full["milvus"]
    a = IndexSpec.from_dict(minimal, namespace="n", index="i")
    assert a == IndexSpec.from_dict(full, namespace="n", index="i")
    assert a.policy == Policy() and a.policy.gate == Gate() and a.embedder == Workload() == a.search
    assert a.ingest == Workload()
    crd.validate({"spec": full})
