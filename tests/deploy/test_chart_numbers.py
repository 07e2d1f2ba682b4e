"""Numbers the chart renders are whole where a whole number is meant.

Helm reads every YAML number of the values as a float64, and Go prints a float64 from a million on
in exponent form: `{{ 604800000 | toString }}` is "6.048e+08", which Kafka (a Strimzi topic
config), the Kubernetes API (replicas, ports, seconds) and the vsearch commands (an env value)
all refuse or misread. Schema validation cannot see it where the field is free-form (a topic's
config, an env value, an annotation), so these tests look at the rendered values themselves: every
profile as it is, and every profile again with each integer value of the schema set to a large
number, walking every rendered object."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import CHART, PROFILES, STATIC_PROFILES, profile_file

# "6.048e+08", "1e+06", "3.0E7": a number in exponent form, quoted or not.
EXPONENT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")
# Integers whose large values the templates refuse for other reasons (kDefault <= kMax, at most
# 50 s with the operator's 60 s grace period): left at their defaults.
KEEP = {("search", "kDefault"), ("ingest", "stopGraceSeconds")}
BIG = 1_234_567_891


def float_formatted(obj, path=()) -> list[str]:
    """Where a rendered object carries a number in exponent form or a whole number as a float."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += float_formatted(v, path + (str(k),))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += float_formatted(v, path + (str(i),))
    elif isinstance(obj, float) and (obj.is_integer() or EXPONENT.match(repr(obj))):
        found.append(f"{'.'.join(path)}: {obj!r} (a float where an integer is meant)")
    elif isinstance(obj, str):
        text = obj.strip()
        if EXPONENT.match(text):
            found.append(f"{'.'.join(path)}: {obj!r} (a number in exponent form)")
        elif text[:1] in "{[" and len(text) < 10_000:
            try:                        # JSON inside a string (VSEARCH_INDEX_PARAMS, args)
                found += float_formatted(json.loads(text), path + ("<json>",))
            except ValueError:
                pass
    return found


def integer_paths(schema: dict, path=()) -> list[tuple[tuple[str, ...], dict]]:
    out = []
    if schema.get("type") == "integer" and path:
        out.append((path, schema))
    for key, sub in (schema.get("properties") or {}).items():
        out += integer_paths(sub, path + (key,))
    return out


def big_values() -> dict:
    """Every integer value that can reach a million (no maximum below it) set to BIG, or to
    its maximum."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values: dict = {}
    for path, node in integer_paths(schema):
        high = node.get("maximum")
        if path in KEEP or (high is not None and high < 1_000_000):
            continue
        node_values = values
        for key in path[:-1]:
            node_values = node_values.setdefault(key, {})
        node_values[path[-1]] = BIG if high is None else int(high)
    return values


def test_the_walk_sees_exponents_and_whole_floats():
    assert float_formatted({"a": {"b": "6.048e+08"}})
    assert float_formatted({"a": [{"b": 1.2096e+09}]})
    assert float_formatted({"replicas": 3.0})
    assert float_formatted({"env": [{"value": '{"M": 1e+06}'}]})
    assert not float_formatted({"minSelfScore": 0.99, "margin": 0.02, "retention.ms": 604800000,
                                "name": "1e3-model", "value": "5"})


@pytest.mark.parametrize("profile", PROFILES)
def test_no_profile_renders_a_float_where_an_integer_is_meant(tools, profile):
    for obj in tools.render(profile):
        bad = float_formatted(obj)
        assert not bad, f"{profile}: {obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(bad)


@pytest.mark.parametrize("profile", PROFILES)
def test_large_integer_values_render_as_integers(tools, tmp_path, profile):
    """Each integer value at a large value (ports and bounded values at their maximum): the
    rendered objects carry it digit for digit, never in exponent form."""
    big = tmp_path / "big-values.yaml"
    big.write_text(yaml.safe_dump(big_values()))
    res = tools.template(profile_file(profile), big)
    objs = k8s.load_all(res.stdout)
    for obj in objs:
        bad = float_formatted(obj)
        assert not bad, f"{profile}: {obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(bad)
    assert str(BIG) in res.stdout, "the large values were not rendered at all"
    if profile not in STATIC_PROFILES:
        index = next(o for o in objs if o["kind"] == "SearchIndex")
        assert index["spec"]["rollout"]["retentionSeconds"] == 31536000
        assert index["spec"]["ingest"]["replicas"] == BIG


def test_full_profile_topic_configs_are_whole_numbers(tools):
    """The issue's own case: the Strimzi topics' configs as Kafka wants them."""
    topics = {o["spec"]["topicName"]: o["spec"] for o in tools.render("full") if o["kind"] == "KafkaTopic"}
    catalog = topics["catalog.images"]["config"]
    assert catalog == {"cleanup.policy": "compact", "min.compaction.lag.ms": 3600000,
                       "delete.retention.ms": 604800000, "retention.ms": -1}
    assert topics["catalog.images.dlq"]["config"]["retention.ms"] == 1209600000
    assert topics["search.events"]["config"]["retention.ms"] == 2592000000
    for spec in topics.values():
        assert isinstance(spec["partitions"], int) and isinstance(spec["replicas"], int)


def test_the_plain_manifests_carry_no_float_formatted_numbers():
    """manifests/ is rendered from the chart (.ci/chart_manifests.py): the same check on every
    object but the CRD (a schema, whose number defaults are floats on purpose)."""
    files = sorted(k8s.MANIFESTS.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in k8s.load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                continue
            bad = float_formatted(doc)
            assert not bad, f"{path.relative_to(k8s.REPO)}:\n" + "\n".join(bad)
