# The one entry point: `make test` builds .venv when missing, then runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test test-slow test-all lint demo bench clean

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

# Only the tests marked slow (CI runs them after `make test`).
test-slow: venv
	$(PY) -m pytest -q -m slow

# The README's main job: ResNet-8 plain, with SE and with CBAM on the cluttered digits, two seeds each, compared,
# then pictures of what CBAM attends to (outputs in runs/demo; docs/demo.md).
demo: venv
	$(PY) -m cbam demo --output runs/demo

# Time and memory of CBAM vs plain / SE / timm, as ratios (see README); add ARGS=--full for batch-32 shapes.
bench: venv
	$(PY) -m cbam bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
