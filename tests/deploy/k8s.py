"""What the deployment tests share: running the real helm and kubectl, validating rendered
objects (built-in kinds with kubernetes-validate, custom resources against their CRD's
openAPIV3Schema with jsonschema), finding every pod spec, and the configuration contract (which
``VSEARCH_*`` variables a command accepts, derived from its argparse parser)."""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import yaml

from vsearch.cli import build_parser, command_env_vars

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "vsearch"
MANIFESTS = REPO / "manifests"
SCHEMAS = REPO.parent / "shared" / "schemas"
PROFILES = ("minimal", "full", "gpu", "no-operator")
# The profiles without the operator (the chart's own embedder and consumer).
STATIC_PROFILES = ("no-operator",)
RELEASE, NAMESPACE = "vsearch", "vsearch"

# Custom resources the chart renders -> the CRD file that defines them (../shared/schemas).
CRD_FILES = {
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
    ("milvus.io", "Milvus"): "milvus.io_milvuses.yaml",
    ("kafka.strimzi.io", "KafkaTopic"): "kafka.strimzi.io_kafkatopics.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("trainer.kubeflow.org", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
}
# The project's own CRDs: the chart's copy (tests/deploy/test_chart_operator.py checks it is
# operators/searchindex.yaml byte for byte).
OWN_CRDS = {("vsearch.io", "SearchIndex"): CHART / "crds" / "searchindex.yaml"}


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


def load_all(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# --------------------------------------------------------------------------- built-in kinds

def split_api(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def is_builtin(obj: dict) -> bool:
    group, _ = split_api(obj["apiVersion"])
    return group == "" or group.endswith(".k8s.io") or group in (
        "apps", "batch", "policy", "autoscaling")


def validate_builtin(obj: dict, version: str) -> None:
    """Strict kubernetes-validate for one object (raises kubernetes_validate.ValidationError)."""
    kubernetes_validate.validate(obj, version, strict=True)


def supported_versions() -> list[str]:
    """Kubernetes minor versions kubernetes-validate has schemas for, oldest first."""
    return list(kubernetes_validate.utils.all_versions())


# --------------------------------------------------------------------------- custom resources

def _strict(node):
    """The CRD schema as the API server applies it with strict field validation: unknown fields
    of an object with declared properties are errors (unless x-kubernetes-preserve-unknown-fields),
    int-or-string accepts both, exclusive bounds are JSON Schema's."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    # OpenAPI v3.0's exclusiveMinimum/-Maximum are flags on minimum/maximum; JSON Schema's the bound
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(flag), bool):
            del out[flag]
            if node[flag] and bound in node:
                out[flag] = out.pop(bound)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def has_crd(group: str, kind: str) -> bool:
    return (group, kind) in OWN_CRDS or (group, kind) in CRD_FILES


@lru_cache(maxsize=None)
def crd_schema(group: str, kind: str, version: str) -> dict:
    path = OWN_CRDS.get((group, kind)) or SCHEMAS / CRD_FILES[(group, kind)]
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", True):
                raise AssertionError(f"{kind} {group}/{version} is not served by its CRD")
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            # metadata is checked by the API server itself, not by the CRD's schema
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            return _strict(schema)
    raise AssertionError(f"{path.name} has no version {version} (has "
                         f"{[v['name'] for v in crd['spec']['versions']]})")


def validate_custom(obj: dict) -> list[str]:
    """Errors of one custom resource against its CRD's schema (empty: valid)."""
    group, version = split_api(obj["apiVersion"])
    schema = crd_schema(group, obj["kind"], version)
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))]


# --------------------------------------------------------------------------- pod specs

KSERVE_ONLY = ("minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget",
               "labels", "annotations", "containerConcurrency", "timeout", "canaryTrafficPercent",
               "logger", "batcher", "deploymentStrategy", "autoScaling", "storageUris", "workerSpec")


def pod_specs(obj: dict) -> list[tuple[str, dict, dict]]:
    """``(where, pod spec, pod labels)`` of every pod an object runs."""
    kind = obj["kind"]
    name = f"{kind}/{obj['metadata']['name']}"
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return [(name, spec, obj["metadata"].get("labels", {}))]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        t = spec["template"]
        return [(name, t["spec"], t["metadata"].get("labels", {}))]
    if kind == "CronJob":
        t = spec["jobTemplate"]["spec"]["template"]
        return [(name, t["spec"], t["metadata"].get("labels", {}))]
    if kind == "TrainingRuntime":
        return [(f"{name}.{j['name']}", j["template"]["spec"]["template"]["spec"],
                 (j["template"]["spec"]["template"].get("metadata") or {}).get("labels", {}))
                for j in spec["template"]["spec"]["replicatedJobs"]]
    if kind == "InferenceService":
        out = []
        for part in ("predictor", "transformer", "explainer"):
            comp = spec.get(part)
            if comp:
                pod = {k: v for k, v in comp.items() if k not in KSERVE_ONLY}
                out.append((f"{name}.{part}", pod, comp.get("labels", {})))
        return out
    return []


# --------------------------------------------------------------------------- the config contract

def find_command(parser: argparse.ArgumentParser, args: list[str]):
    """The sub-command words of ``vsearch ARGS``, or ``(None, words)`` when the command does
    not exist."""
    words: list[str] = []
    for word in args:
        if word.startswith("-"):
            break
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if word not in subs[0].choices:
            return None, words + [word]
        parser = subs[0].choices[word]
        words.append(word)
    return parser, words


# The command each workload of a SearchIndex runs (operators/workloads.py: ``vsearch`` with the
# operator's flags, then the workload's ``args``; its ``env`` as the container's).
SEARCHINDEX_COMMANDS = {"embedder": ["serve", "embedder"], "ingest": ["ingest"]}


def accepted_env(args: list[str]) -> set[str] | None:
    """The ``VSEARCH_*`` variables that ``vsearch ARGS`` reads (the commands' own record of
    their variables, ``vsearch.cli.command_env_vars``); None when the command does not exist (yet)."""
    parser, words = find_command(build_parser(), args)
    return None if parser is None else command_env_vars(*words)


# --------------------------------------------------------------------------- helm and kubectl

class Tools:
    def __init__(self, helm: Path, kubectl: Path):
        self.helm, self.kubectl = helm, kubectl

    def template(self, *values_files, set_values=(), namespace=NAMESPACE, release=RELEASE,
                 check=True, extra=()) -> subprocess.CompletedProcess:
        argv = [self.helm, "template", release, CHART, "--namespace", namespace]
        for f in values_files:
            argv += ["-f", f]
        for s in set_values:
            argv += ["--set", s]
        argv += list(extra)
        res = run(argv)
        if check and res.returncode != 0:
            raise AssertionError(f"helm template failed:\n{res.stderr}")
        return res

    def render(self, profile: str, *more_files, set_values=()) -> list[dict]:
        res = self.template(CHART / "ci" / f"{profile}-values.yaml", *more_files, set_values=set_values)
        return load_all(res.stdout)


def profile_file(profile: str) -> Path:
    return CHART / "ci" / f"{profile}-values.yaml"


def image_tag(image: str) -> str | None:
    """The tag of an image reference (None when it has a digest or no tag)."""
    if "@" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


SEMVER_RANGE_LOW = re.compile(r">=\s*v?(\d+)\.(\d+)")
