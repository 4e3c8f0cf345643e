# Two entry points: `make demo` (set-up + the main job) and `make test` (set-up + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?= -q -n 2 --durations=40

.PHONY: setup data demo test bench docs clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) || exit 1; \
	else \
	  echo "Fashion-MNIST is missing from $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'" \
	       "or set JTRANSFER_FMNIST_DIR to a directory holding its IDX files" >&2; exit 1; \
	fi

# The demo grid (experiments.fewshot's embedded default, a few minutes); its report ends with
# the full grid's command (README, "The main command").
demo: setup
	JAX_PLATFORMS=cpu $(PY) -m experiments.fewshot --out results/fewshot --overwrite

test: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	JAX_PLATFORMS=cpu $(PY) -m bench.run

# API reference pages (HTML) for jtransfer from its docstrings; tests/test_docs.py builds the same
# pages and fails on any pdoc warning.
DOCS_OUT ?= docs/api
docs: setup
	JAX_PLATFORMS=cpu $(PY) -m pdoc --docformat google --output-directory $(DOCS_OUT) jtransfer

clean:
	rm -rf results .cache $(VENV)
