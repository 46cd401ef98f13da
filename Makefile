# Set-up and the two quick-start commands. Each target creates or reuses .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.priorlab-installed

.PHONY: run test test-fast lint

# pip's own find-links (a local torch wheel, as on the CPU machines here) are handed to uv, which reads no pip config.
FIND_LINKS := $(strip $(PIP_FIND_LINKS) $(shell python3 -m pip config get global.find-links 2>/dev/null))

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip install -q --python $(PY) $(foreach d,$(sort $(FIND_LINKS)),--find-links $(d)) -r requirements.lock   # the exact, tested environment, torch included (uv: faster than pip)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e '.[dev]'  # priorlab itself; its declared ranges admit the lock
	$(PY) -m pip check
	touch $(STAMP)

# The main job on the embedded default: the dropout-vs-prior study, quick preset (toy2d, CPU, 2 cores: about 12 min, 14 with the install).
run: $(STAMP)
	$(VENV)/bin/priorlab study dropout_vs_prior preset=quick

# Bytecode is written on first import, into .venv and src/ (git-ignored), even where PYTHONDONTWRITEBYTECODE is set:
# without it every test process compiles torch's modules from source again; compiling all at install costs more.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n auto --dist loadscope --no-loadscope-reorder   # a worker per core; modules whole, longest first (tests/conftest.py)

# The unit tier, for the inner loop: everything but the end-to-end tests (studies, processes; tests/conftest.py).
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n auto --dist loadscope --no-loadscope-reorder -m "not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
