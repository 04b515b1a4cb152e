# libtorchrt — the two set-up commands are `make demo` and `make test`; both install
# what they need into .venv first (torch is pinned here, not in pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# test processes (pytest-xdist), each running whole files: the suite is mostly waiting
# (pool starts, workers, servers), and a file's module-scoped pools stay in one process
TEST_JOBS ?= 2

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml setup.py libtorchrt/transport/_lanes.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed          ## a pool of 2 workers on a bundled example model
	$(PY) examples/demo.py

test: $(VENV)/.installed          ## unit + integration tests (GPU tests skip without CUDA)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check libtorchrt tests benchmarks examples
	$(VENV)/bin/mypy libtorchrt

bench: $(VENV)/.installed         ## the core benchmarks (docs/benchmarks.md)
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) build dist *.egg-info demo-repository
