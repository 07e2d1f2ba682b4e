"""The ``SearchIndex`` CustomResourceDefinition (``searchindexes.vsearch.io``, ``v1alpha1``):
the YAML beside this file, its OpenAPI schema, and validation of objects against it.

A real API server validates (and defaults) every object against the schema on admission; the
in-memory test API (kmock) does not, so the operator validates again on every reconcile and
:func:`validate` gives the same messages a person reads in ``kubectl apply``'s refusal.

Unknown fields: the schema is structural (a real API server refuses ``additionalProperties``
beside ``properties``), so the server *prunes* fields the schema does not declare (with
``fieldValidation=Strict``, kubectl's default since 1.27, it refuses them instead: ``unknown
field "spec.model.colour"``). The operator relies on pruning: :func:`prune` drops the same
fields before the object is read (on kmock, which stores anything, too), and
:func:`unknown_fields` lists them in the strict server's words. :func:`validate` accepts
exactly what a server accepts under ``fieldValidation=Warn``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

GROUP = "vsearch.io"
VERSION = "v1alpha1"
PLURAL = "searchindexes"
KIND = "SearchIndex"
CRD_PATH = Path(__file__).with_name("searchindex.yaml")


class InvalidSearchIndex(ValueError):
    """The object does not match the CRD's schema; ``errors`` lists each problem."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@functools.lru_cache(maxsize=1)
def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict:
    """The ``openAPIV3Schema`` of the served version."""
    return copy.deepcopy(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _to_jsonschema(node):
    """OpenAPI v3 -> JSON Schema: drop the ``x-kubernetes-*`` keys jsonschema does not know;
    ``nullable: true`` (the status' fields) admits ``null``."""
    if isinstance(node, dict):
        out = {k: _to_jsonschema(v) for k, v in node.items()
               if not k.startswith("x-kubernetes-") and k != "nullable"}
        if node.get("nullable") and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        # OpenAPI v3.0's exclusiveMinimum/-Maximum are flags on minimum/maximum; JSON Schema's the bound
        for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(flag), bool):
                del out[flag]
                if node[flag] and bound in node:
                    out[flag] = out.pop(bound)
        return out
    if isinstance(node, list):
        return [_to_jsonschema(v) for v in node]
    return node


def _walk_unknown(node, schema: dict, path: str, out: list[str], drop: bool):
    """Unknown keys of ``node`` under ``schema`` (recorded in ``out``; removed when ``drop``)."""
    if not isinstance(schema, dict):
        return
    if isinstance(node, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            for key in list(node):
                sub = f"{path}.{key}" if path else key
                if key in props:
                    _walk_unknown(node[key], props[key], sub, out, drop)
                else:
                    out.append(sub)
                    if drop:
                        del node[key]
        elif isinstance(extra, dict):
            for key, value in node.items():
                _walk_unknown(value, extra, f"{path}.{key}" if path else key, out, drop)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(node):
            _walk_unknown(value, schema["items"], f"{path}[{i}]", out, drop)


def unknown_fields(obj: dict) -> list[str]:
    """Fields of ``obj`` the schema does not declare, as a strict server names them
    (``spec.model.colour``); ``metadata`` is the API server's own and not looked into."""
    out: list[str] = []
    body = {k: v for k, v in obj.items() if k != "metadata"}
    _walk_unknown(body, schema(), "", out, drop=False)
    return out


def _default(node, schema: dict):
    if not isinstance(schema, dict):
        return
    if isinstance(node, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if key in node:
                _default(node[key], sub)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for value in node:
            _default(value, schema["items"])


def apply_defaults(obj: dict) -> dict:
    """A copy of ``obj`` with the schema's defaults filled in where a field is absent, nested
    ones included (objects such as ``spec.rollout`` default to ``{}``, so their fields' defaults
    apply too): what a real API server stores. The schema is the one home of every default;
    :class:`vsearch.operators.resource.Spec` (so :class:`vsearch.operators.spec.IndexSpec`) reads
    defaulted objects only: its fields that the schema defaults are required."""
    out = copy.deepcopy(obj)
    _default(out, schema())
    return out


def prune(obj: dict) -> dict:
    """A copy of ``obj`` without the fields the schema does not declare: what a real API server
    stores (and so what the operator reads) for an object sent with unknown fields."""
    out = copy.deepcopy(obj)
    meta = out.pop("metadata", None)
    _walk_unknown(out, schema(), "", [], drop=True)
    if meta is not None:
        out["metadata"] = meta
    return out


def _path(error) -> str:
    """The field path as the API server writes it: ``spec.ingest.imagePullSecrets[0].name``."""
    out = ""
    for p in error.absolute_path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(the object)"


def validate(obj: dict) -> None:
    """Raise :class:`InvalidSearchIndex` listing every schema violation of ``obj`` (a whole
    object with ``spec``), worded like the API server's: ``spec.model.version: ...``."""

    validator = jsonschema.Draft7Validator(_to_jsonschema(schema()))
    errors = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = _path(err)
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            where = f"{where}.{missing}" if where != "(the object)" else missing
            errors.append(f"{where}: Required value")
        elif err.validator == "enum":
            errors.append(f"{where}: Unsupported value: {err.instance!r}: supported values: "
                          + ", ".join(repr(v) for v in err.validator_value))
        elif err.validator == "additionalProperties":
            errors.append(f"{where}: {err.message}")
        elif err.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            rel = {"minimum": "greater than or equal to", "maximum": "less than or equal to",
                   "exclusiveMinimum": "greater than", "exclusiveMaximum": "less than"}[err.validator]
            errors.append(f"{where}: Invalid value: {err.instance!r}: should be {rel} {err.validator_value}")
        elif err.validator == "pattern":
            errors.append(f"{where}: Invalid value: {err.instance!r}: should match '{err.validator_value}'")
        elif err.validator == "type":
            errors.append(f"{where}: Invalid value: {err.instance!r}: must be of type {err.validator_value}")
        else:
            errors.append(f"{where}: {err.message}")
    if errors:
        raise InvalidSearchIndex(errors)
