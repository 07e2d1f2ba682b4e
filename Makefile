# Set-up is two commands: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vsearch demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# Every benchmark prints a table with a baseline measured in the same run. bench.search at
# 1M vectors takes about 50 minutes here: `$(PY) -m bench.search` runs 100k and 1M.
bench: $(STAMP)
	$(PY) -m bench.embedder
	$(PY) -m bench.ingest
	$(PY) -m bench.trainer
	$(PY) -m bench.search --sizes 100000

clean:
	rm -rf $(VENV) .pytest_cache .demo .bench
