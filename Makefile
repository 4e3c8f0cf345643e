# Two entry points: `make demo` (set-up + the main job) and `make test` (set-up + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?= -q -n 2 --durations=40
# tcmalloc keeps the CPU step's freed buffers for reuse instead of faulting fresh pages in every
# step (jtransfer/cpu_allocator.py, bench/MALLOC.md); an LD_PRELOAD of the caller's wins. Found
# when the recipe runs, so the set-up that installs it serves the same `make` call.
MULTIARCH := $(shell python3 -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH") or "*")')
RUN := JAX_PLATFORMS=cpu TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776 \
  LD_PRELOAD="$${LD_PRELOAD:-$$(ls /usr/lib/$(MULTIARCH)/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)}"

.PHONY: setup data malloc demo test bench docs clean

setup: $(VENV)/.installed data malloc

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

# Debian's libtcmalloc-minimal4, when it can be installed (tried once: the stamp); without it
# the commands run on glibc's malloc, slower but the same values, so its absence is no error.
malloc: $(VENV)/.malloc-tried

$(VENV)/.malloc-tried: | $(VENV)/.installed
	@if ls /usr/lib/$(MULTIARCH)/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && \
	    apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) || \
	  echo "libtcmalloc-minimal4 not installed: the commands use glibc's malloc (jtransfer/cpu_allocator.py)"; \
	fi
	@touch $@

# The demo grid (experiments.fewshot's embedded default, a few minutes); its report ends with
# the full grid's command (README, "The main command").
demo: setup
	$(RUN) $(PY) -m experiments.fewshot --out results/fewshot --overwrite

test: setup
	$(RUN) $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(RUN) $(PY) -m bench.run

# API reference pages (HTML) for jtransfer from its docstrings; tests/test_docs.py builds the same
# pages and fails on any pdoc warning.
DOCS_OUT ?= docs/api
docs: setup
	JAX_PLATFORMS=cpu $(PY) -m pdoc --docformat google --output-directory $(DOCS_OUT) jtransfer

clean:
	rm -rf results .cache $(VENV)
