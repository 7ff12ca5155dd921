# Two commands do all the set-up on a fresh machine:
#   make demo   - embedded broker, synthetic clicks, a trained GRU4Rec, live recommendations
#   make test   - lint (ruff, mypy, import contracts) + the whole test suite, with coverage
# Both create .venv in the project on first use.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch (on this workplace it installs from local disk). A bare range would
# pull a multi-GB CUDA build; the GPU machine brings its own torch 2.11 instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast lint typecheck demo clean mutation

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# mypy alone (files and settings in pyproject.toml [tool.mypy]); `make lint` runs it too.
typecheck: install
	$(VENV)/bin/mypy

# The whole suite (the broker tests start their own embedded broker), with line coverage of
# streamrec and trainer as measured in the test process (child processes are not counted).
test: lint
	$(PY) -m pytest --cov --cov-report=term:skip-covered

# The unit tests alone, for the edit-test loop: no broker, nothing marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not broker and not slow"

# Mutation testing (not in CI: the whole scope takes hours on 2 shared cores): mutmut
# ([tool.mutmut] in pyproject.toml) over the modules that carry the README's promises, each mutant
# against the fast unit tests that reach its function; then the score and the survivors by module
# (bench/results/mutation-testing.md triages them). MUTANTS='glob ...' runs the mutants whose
# names match (e.g. MUTANTS='streamrec.serving.events.*'); SAMPLE=N runs a seeded random sample
# of N mutants per module (MODULES='streamrec.serving.pipeline ...' to pick modules), and the
# summary gives each module's score with its 95 % interval. Results are kept in mutants/: a
# second run redoes only the functions that changed (rm -rf mutants for a fresh one).
mutation: install
	OMP_NUM_THREADS=1 PYTHONPATH=tests $(PY) -m mutmut run --max-children 2 $(MUTANTS) \
		$(if $(SAMPLE),$$(PYTHONPATH=tests $(PY) tests/mutmut_sample.py $(SAMPLE) $(MODULES)))
	PYTHONPATH=tests $(PY) tests/mutmut_summary.py

demo: install
	$(VENV)/bin/streamrec demo

clean:
	rm -rf $(VENV) var runs mutants .pytest_cache .ruff_cache .mypy_cache .import_linter_cache .coverage
