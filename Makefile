# The one entry point: `make test` builds .venv when missing, then runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test test-slow test-all test-keras-backends lint demo bench clean

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

# tests/keras on the TensorFlow and JAX backends (`make test` runs them on the PyTorch one), in a venv of their own
# (tensorflow-cpu and jax[cpu] are a large download and pin other packages; docs/keras.md). CI runs it after test-slow.
KERAS_VENV ?= .venv-keras
test-keras-backends: $(KERAS_VENV)/.installed
	KERAS_BACKEND=tensorflow $(KERAS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/keras
	KERAS_BACKEND=jax $(KERAS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/keras

$(KERAS_VENV)/.installed: pyproject.toml
	test -x $(KERAS_VENV)/bin/python || $(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/python -m pip install -q -e '.[keras]' pytest hypothesis 'tensorflow-cpu==2.21.*' 'jax[cpu]==0.10.2'
	touch $@

# The README's main job: ResNet-8 plain, with SE and with CBAM on the cluttered digits, two seeds each, compared,
# then pictures of what CBAM attends to (outputs in runs/demo; docs/demo.md).
demo: venv
	$(PY) -m cbam demo --output runs/demo

# Time and memory of CBAM vs plain / SE / timm, as ratios (see README); add ARGS=--full for batch-32 shapes.
bench: venv
	$(PY) -m cbam bench $(ARGS)

clean:
	rm -rf $(VENV) $(KERAS_VENV) build *.egg-info src/*.egg-info
