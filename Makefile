# Two set-up commands for a fresh machine: `make demo` and `make test` each create .venv
# and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The hub is unreachable here: without this, open_clip/huggingface look-ups retry for ~47 s.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-demo test-fast test-floors test-newest lint typecheck format bench clean

# setuptools warns of every editable install that maps folders into a package (ours: merging/ is
# micromerge.merging) that a folder named like the package may shadow it; here that folder is the
# package's own (micromerge/), so a new user's first command would print a box about nothing.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/micromerge demo

# Workers for `make test`: CI machines have 2 cores (more workers than cores only adds contention,
# and each worker imports torch: ~1.5 GB). Tests go out a test or two at a time to the worker that is free,
# slow ones first (tests/conftest.py), so the minutes-long demo never starts last.
TEST_WORKERS ?= 2
# What `make test`, test-floors and test-newest run: all but the default demo's own test (test-demo).
SUITE := not default_demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -m "$(SUITE)"

# The default demo's own test (README's numbers), which `make test` leaves out to stay within CI's 20
# minutes on a slow machine; `make test` runs a demo of half its work with the same assertions.
test-demo: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m default_demo

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -m "not slow"

# The suite with every dependency at the floor pyproject.toml declares (each `NAME>=V` installed as
# `NAME==V`, so a floor that cannot be installed with the others fails here) on the oldest Python it
# allows: run by hand when a floor or a library call changes (BENCHMARKS.md). CI's `make test`
# installs the current releases.
FLOORS_PYTHON ?= python3.10
FLOORS_VENV := .venv-floors

test-floors:
	rm -rf $(FLOORS_VENV) && $(FLOORS_PYTHON) -m venv $(FLOORS_VENV)
	grep -oE '"[A-Za-z0-9_.-]+>=[0-9][^",;]*' pyproject.toml | tr -d '"' | sed 's/>=/==/' >$(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q uv
	$(FLOORS_VENV)/bin/uv pip install -q --python $(FLOORS_VENV)/bin/python -c $(FLOORS_VENV)/floors.txt -e '.[dev]'
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -m "$(SUITE)"

# Its counterpart: the newest release of every dependency, constraints.txt's pins lifted (torch and
# webdataset are held back there for this project's machines), on the newest Python: what a user
# installing micromerge today gets. uv, because it reads no pip configuration (a machine's pip
# constraints would hold torch back as well). Run by hand, like test-floors.
NEWEST_PYTHON ?= python3.13
NEWEST_VENV := .venv-newest

test-newest:
	rm -rf $(NEWEST_VENV) && $(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q uv
	$(NEWEST_VENV)/bin/uv pip install -q --python $(NEWEST_VENV)/bin/python -e '.[dev]'
	$(NEWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -m "$(SUITE)"

lint: typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy finds a package by its folder, and micromerge.merging lives in merging/ (pyproject's package-dir,
# these five stages): it checks a tree of links laid out as the installed package is.
STAGES := merging eval finetune analysis checkpoints
TYPECHECK_TREE := build/typecheck

typecheck: $(STAMP)
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/micromerge
	ln -s $(CURDIR)/micromerge/* $(TYPECHECK_TREE)/micromerge/
	for stage in $(STAGES); do ln -s $(CURDIR)/$$stage $(TYPECHECK_TREE)/micromerge/$$stage; done
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(BIN)/mypy -p micromerge --config-file $(CURDIR)/pyproject.toml \
		--python-executable $(CURDIR)/$(BIN)/python

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(NEWEST_VENV) build *.egg-info .pytest_cache
