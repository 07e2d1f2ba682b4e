"""Shared fixtures. Each component's fixtures live in ``tests/fixtures/<name>.py``.

Which tests are ``slow`` (left out by ``make test-fast``), decided here in one place besides the
``@pytest.mark.slow`` of single tests: every test that needs a server that takes seconds to start
(a KServe model server, the search service and its indexed catalog, the Milvus 2.3.5 standalone
server, the kmock cluster with real workloads), and the files whose every test trains, renders
the chart with helm, runs the demo or drives a browser. What stays is the inner loop: unit tests
and the integration tests on the broker and Milvus Lite, which start in about a second.
"""

import fnmatch
from pathlib import Path

import pytest
import torch

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.servers",
    "tests.fixtures.services",
    "tests.fixtures.search",
    "tests.fixtures.operators",
]


@pytest.fixture(autouse=True, scope="session")
def _two_torch_threads():
    """The test process is the entry point that owns torch's process-wide thread count."""
    torch.set_num_threads(2)


SLOW_FIXTURES = {"embedder_service", "onnx_embedder_url", "search_server", "search_catalog", "milvus_standalone_uri",
                 "cluster", "rollout_models", "hardened"}
SLOW_FILES = {"tests/deploy", "tests/local", "tests/test_fuzz.py", "tests/trainer/test_train.py",
              "tests/trainer/test_bench_quality.py", "tests/trainer/test_default_model.py",
              "tests/trainer/test_collections.py", "tests/trainer/test_distributed.py",
              "tests/predictor/search/test_web_page.py"}
# Single tests over ~10 s (measured with --durations) in files that other tests keep fast.
SLOW_TESTS = {
    "tests/core/test_store.py::*[standalone]",                 # the Milvus 2.3.5 standalone server
    "tests/operators/test_offline_verdict.py::test_the_embedder_reports_its_model_and_evaluation",
    "tests/predictor/search/test_model_versions.py::test_each_query_is_embedded_by_the_model_of_the_collection_it_searches",
    "tests/ingest/test_poison.py::test_poison_records_from_a_third_party_producer_never_stop_ingest",
    "tests/predictor/search/test_events.py::test_vsearch_ctr_reads_the_topic",
    "tests/predictor/search/test_experiment_report.py::test_report_of_the_newest_experiment_as_table_json_and_png",
    "tests/predictor/test_standard_clients.py::test_embedder_key_body_limit_and_queue",
    "tests/trainer/test_clicks.py::test_click_pairs_from_a_real_topic_train_with_the_catalog_mixed_in",
}
# The longest files first (measured, longest first): with `-n 2 --dist loadfile
# --no-loadscope-reorder` (the Makefile) a worker takes whole files in collection order, so a
# long file collected last would run alone at the end while the other worker idles. (Without
# --no-loadscope-reorder xdist sorts the files by their number of tests and this order is lost.)
LONG_FILES_FIRST = [       # by their measured time, longest first (pytest --junitxml, 2026-12-03)
    "tests/operators/test_training.py", "tests/local/test_demo_rollout.py", "tests/operators/test_gate.py",
    "tests/operators/test_rollout.py", "tests/ingest/test_consumer.py", "tests/local/test_demo_loop.py",
    "tests/core/test_store.py", "tests/deploy/test_chart_operator.py", "tests/trainer/test_train.py",
    "tests/local/test_demo.py", "tests/predictor/search/test_search_ops.py", "tests/ingest/test_poison.py",
    "tests/predictor/search/test_model_versions.py", "tests/deploy/test_chart_helm_test.py",
    "tests/predictor/search/test_web_page.py", "tests/docs/test_readme.py",
    "tests/operators/test_offline_verdict.py", "tests/predictor/test_model.py", "tests/test_cli.py",
    "tests/trainer/test_distributed.py", "tests/operators/test_experiment.py",
    "tests/predictor/search/test_search_e2e.py", "tests/trainer/test_bench_quality.py",
    "tests/predictor/search/test_events.py", "tests/trainer/test_validation.py",
    "tests/predictor/search/test_experiments.py",
]
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = Path(item.path).resolve().relative_to(ROOT)
        if (SLOW_FIXTURES & set(item.fixturenames)
                or any(rel == Path(f) or Path(f) in rel.parents for f in SLOW_FILES)
                or any(fnmatch.fnmatchcase(f"{rel.as_posix()}::{item.name}", t) for t in SLOW_TESTS)):
            item.add_marker(pytest.mark.slow)
    rank = {f: i for i, f in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda it: rank.get(Path(it.path).resolve().relative_to(ROOT).as_posix(), len(rank)))
