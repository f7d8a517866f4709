# The one entry point: `make test` builds .venv when missing, then runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# glibc's malloc returns big blocks to the OS and page-faults every new tensor; keep them (see README).
TUNED_MALLOC := MALLOC_MMAP_THRESHOLD_=100000000000 MALLOC_TRIM_THRESHOLD_=100000000000

.PHONY: venv test test-all lint demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests

test: venv lint
	$(PY) -m pytest -q

test-all: venv lint
	$(PY) -m pytest -q -m ''

# The README's main job: a plain and a CBAM ResNet trained on synthetic data, compared (outputs in runs/demo).
demo: venv
	$(TUNED_MALLOC) $(PY) -m cbam demo --output runs/demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
