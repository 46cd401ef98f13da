# Set-up and the two quick-start commands. Each target creates or reuses .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.priorlab-installed

.PHONY: run test test-fast lint

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv==0.13.9
	$(PY) -m pip install -q $$(grep '^torch==' requirements.lock)   # through pip, whose config may name a local wheel (the CPU one here)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -r requirements.lock   # the exact, tested environment (uv: faster than pip; bytecode compiled as pip does)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e '.[dev]'  # priorlab itself; its declared ranges admit the lock
	$(PY) -m pip check
	touch $(STAMP)

# The main job on the embedded default: the dropout-vs-prior study, quick preset (toy2d, CPU, 2 cores: about 12 min, 14 with the install).
run: $(STAMP)
	$(VENV)/bin/priorlab study dropout_vs_prior preset=quick

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -n auto --dist loadscope --no-loadscope-reorder   # a worker per core; modules whole, longest first (tests/conftest.py)

# The unit tier, for the inner loop: everything but the end-to-end tests (studies, processes; tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest -n auto --dist loadscope --no-loadscope-reorder -m "not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
