"""The pydantic models of the SearchIndex resource (``vsearch.operators.resource``) cannot drift
from the CRD (``searchindex.yaml``): the same properties at every depth, both ways, of the same
types; required where the schema requires or defaults (the schema is the one home of every
default: the spec's models have none); extra fields as the schema prunes them; and a status
read from an object is written back as the same JSON."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest

from vsearch.operators import crd, resource
from vsearch.operators.rollout import Step

JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "object": dict, "array": list}


def _unwrap(annotation):
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, annotation
        return args[0]
    return annotation


def _accepts_none(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _python_type(annotation):
    """The JSON type a field's annotation stands for: str, int, float, bool, dict (a mapping or a
    model), list."""
    a = _unwrap(annotation)
    origin = typing.get_origin(a) or a
    if isinstance(origin, type) and issubclass(origin, pydantic.BaseModel):
        return dict
    return origin


def _walk(node: dict, model: type[pydantic.BaseModel], path: str, *, status: bool, seen: list[str]):
    props = node.get("properties") or {}
    fields = {f.alias: (name, f) for name, f in model.model_fields.items()}
    assert set(props) == set(fields), (f"{path} ({model.__name__}): only in the CRD {sorted(set(props) - set(fields))}, "
                                       f"only in the model {sorted(set(fields) - set(props))}")
    keeps = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    assert model.model_config["extra"] == ("allow" if keeps else "ignore"), \
        f"{path}: the CRD {'keeps' if keeps else 'prunes'} unknown fields, {model.__name__} does not"
    required = set(node.get("required") or [])
    for key, sub in props.items():
        name, field = fields[key]
        where = f"{path}.{key}"
        seen.append(where)
        assert JSON_TYPES[sub["type"]] is _python_type(field.annotation), \
            f"{where}: {sub['type']} in the CRD, {field.annotation} in {model.__name__}.{name}"
        if status:
            assert field.is_required() == (key in required), where
            if key not in required:
                assert sub.get("nullable") is True and _accepts_none(field.annotation) and field.default is None, where
        else:
            # the CRD is the one home of the defaults: what it defaults, the model requires (the
            # object is defaulted before it is read); what it neither requires nor defaults is None
            assert field.is_required() == (key in required or "default" in sub), where
            if not field.is_required():
                assert field.default is None and _accepts_none(field.annotation), where
            assert "nullable" not in sub, where
        inner = _unwrap(field.annotation)
        if sub["type"] == "array" and isinstance(sub.get("items"), dict) and "properties" in sub["items"]:
            (inner,) = typing.get_args(inner)
            _walk(sub["items"], inner, where + "[]", status=status, seen=seen)
        elif "properties" in sub:
            _walk(sub, inner, where, status=status, seen=seen)
        elif isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
            pytest.fail(f"{where}: {inner.__name__} has fields, the CRD declares none")


def test_the_models_have_the_crds_properties_at_every_depth_and_no_default_of_their_own():
    props = crd.schema()["properties"]
    seen: list[str] = []
    _walk(props["spec"], resource.Spec, "spec", status=False, seen=seen)
    _walk(props["status"], resource.Status, "status", status=True, seen=seen)
    assert "spec.rollout.gate.golden.configMapRef.key" in seen and "spec.ingest.batchSize" in seen
    assert "status.candidate.progress.ratePerSecond" in seen and "status.history[].from" in seen
    assert "status.conditions[].lastTransitionTime" in seen and "status.retired[].retainUntil" in seen


def test_the_walk_finds_a_drift():
    """The check above fails on a property the model lacks and on a default the model repeats."""
    node = crd.schema()["properties"]["spec"]
    node["properties"]["catalog"]["properties"]["colour"] = {"type": "string"}
    with pytest.raises(AssertionError, match="colour"):
        _walk(node, resource.Spec, "spec", status=False, seen=[])

    class Catalog(resource.SpecModel):
        bootstrap: str
        topic: str = "catalog.images"          # a second home of the CRD's default

    with pytest.raises(AssertionError, match="spec.topic"):
        _walk(crd.schema()["properties"]["spec"]["properties"]["catalog"], Catalog, "spec", status=False, seen=[])


def test_the_spec_is_read_defaulted_and_pruned():
    minimal = {"catalog": {"bootstrap": "k:1"}, "milvus": {"uri": "http://m:1"},
               "model": {"name": "m", "version": "1", "uri": "/m"}}
    with pytest.raises(pydantic.ValidationError):
        resource.Spec.model_validate(minimal)                   # no default of its own
    spec = resource.Spec.model_validate(crd.apply_defaults({"spec": minimal})["spec"])
    assert spec.catalog.topic == "catalog.images" and spec.ingest.batch_size == 256
    assert spec.rollout.gate.golden is None and spec.milvus.token_secret_ref is None
    noisy = crd.apply_defaults({"spec": minimal | {"catalog": {"bootstrap": "k:1", "colour": "red"}}})["spec"]
    assert resource.Spec.model_validate(noisy) == spec         # pruned, as the API server would


STATUS = {
    "phase": "Backfilling", "reason": "Backfilling", "message": "backfilling 2: 10/20 items",
    "phaseSince": "2026-01-01T00:00:00Z", "observedGeneration": 3,
    "serving": {"model": "m", "version": "1", "modelUri": "/m1", "collection": "c1", "consumerGroup": "g1",
                "embedderUrl": "http://e1", "dim": 64, "since": "2026-01-01T00:00:00Z"},
    "candidate": {"model": "m", "version": "2", "modelUri": "/m2", "collection": "c2", "consumerGroup": "g2",
                  "startedAt": "2026-01-01T00:00:00Z", "attempts": 0, "embedderUrl": "http://e2", "dim": 64,
                  "progress": {"indexed": 10, "offsets": {"catalog.images/0": 7}, "servingCount": 20,
                               "ratePerSecond": 2.5, "etaSeconds": 4.0, "idleSeconds": 0.0, "parity": False,
                               "offsetsChangedAt": "2026-01-01T00:00:00Z", "checkedAt": "2026-01-01T00:00:00Z"},
                  "backfillStartedAt": "2026-01-01T00:00:00Z"},
    "previous": None, "gate": None, "failed": None, "rolledBack": None,
    "history": [{"action": "switch", "from": None, "to": "1", "at": "2026-01-01T00:00:00Z"}],
    "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "alias serves 1 (c1)",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}],
    "kopf": {"progress": {"rollout": {"started": "2026-01-01T00:00:00Z"}}},       # kopf's own: kept
}


def test_a_status_reads_typed_and_writes_back_the_same_json():
    st = resource.Status.read(STATUS)
    assert st.candidate.progress.rate_per_second == 2.5 and st.history[0].from_ is None
    assert st.serving.consumer_group == "g1" and st.previous is None
    assert st.dump() == STATUS
    assert resource.Status.read(None).dump() == {}
    crd.validate({"spec": {"catalog": {"bootstrap": "k:1"}, "milvus": {"uri": "http://m:1"},
                           "model": {"name": "m", "version": "1", "uri": "/m"}}, "status": STATUS})


def test_a_status_that_does_not_fit_is_refused_and_nothing_is_done():
    bad = STATUS | {"serving": {"version": "1", "collection": "c1"}}       # no model, no consumer group
    step = Step("i", "n", {"metadata": {"generation": 3}, "spec": {}, "status": bad},
                SimpleNamespace(now=lambda: 0.0))
    out = step.run()
    assert out.status["reason"] == "InvalidStatus"
    assert "status.serving.model" in out.status["message"] and "status.serving.consumerGroup" in out.status["message"]
    assert out.status["serving"] == bad["serving"] and out.status["kopf"] == STATUS["kopf"]


def test_the_printer_columns_and_the_readmes_status_table_name_status_fields():
    for col in crd.crd()["spec"]["versions"][0]["additionalPrinterColumns"]:
        path = col["jsonPath"].split(".")[1:]
        if path[0] != "status":
            continue
        model = resource.Status
        for key in path[1:]:
            fields = {f.alias: f for f in model.model_fields.values()}
            assert key in fields, col
            model = _unwrap(fields[key].annotation)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("starts a rollout. The status", 1)[1].split("\n\n", 2)[1]
    named = {name for line in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert named == {f.alias for f in resource.Status.model_fields.values()}
