# The two set-up commands of the README, and the documentation. Each creates .venv if
# needed and installs the package with the extras it needs; nothing hand-installed
# is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first. These releases are the newest this project's
# machines can install; elsewhere override it, e.g. `make test TORCH="torch"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Extra pytest arguments for every run below, e.g. `make test-fast PYTEST_ARGS=-x`.
PYTEST_ARGS ?=
PYTEST := $(PY) -m pytest
# Warnings are errors: CI builds the site with these options.
SPHINXOPTS ?= -W --keep-going

.PHONY: install test test-fast demo docs dist tutorials lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[all,test]"
	touch $@

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[all,docs]"
	touch $@

install: $(VENV)/.installed

# The whole suite, as CI runs it (.ci/run). The `trained` tests assert an effect on a
# model trained in the session, and the thread count alone changes such a model, so
# they run twice: first alone with one thread, then with two threads inside the run of
# everything else (the fast tests, the demo end to end, the notebooks). Both runs
# always execute; the target fails if either failed.
test: install
	@status=0; \
	OMP_NUM_THREADS=1 $(PYTEST) -m "trained and not gpu" $(PYTEST_ARGS) || status=1; \
	OMP_NUM_THREADS=2 $(PYTEST) -m "not gpu" $(PYTEST_ARGS) || status=1; \
	exit $$status

# For development: no model training, no notebooks.
test-fast: install
	$(PYTEST) -m "not slow and not gpu" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/captum-faithful demo

# The Sphinx site in docs/_build/html: API reference from the docstrings, the
# tutorials with their stored outputs (not re-executed), the guides. The site works
# offline: docs/conf.py installs MathJax with npm into docs/_mathjax (once; a cache,
# not committed) and puts the files the pages load into the site; the last step
# fails if any page still loads a script, stylesheet or image from the network.
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx $(SPHINXOPTS) -b html docs docs/_build/html
	$(PY) .ci/check_offline_html.py docs/_build/html

# The sdist and the wheel in dist/, built in an isolated environment with the newest
# setuptools (as PyPI users get them), their metadata checked with twine, then the
# wheel installed alone into a scratch folder and the README's Quickstart run from
# outside the repository (.ci/check_dist.py). MANIFEST.in says what the sdist holds.
dist: $(VENV)/.dist-installed
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(PY) .ci/check_dist.py dist

$(VENV)/.dist-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet build twine
	touch $@

# Re-executes the tutorials in place (stored outputs) with the quick demo models.
tutorials: install
	cd tutorials && PYTHONPATH=.. ../$(VENV)/bin/jupyter execute --inplace *.ipynb

# Every benchmark with the settings of docs/performance.md, one after the other, one
# thread per process; outputs in benchmark-results/ (hours: run on a quiet machine;
# `$(PY) -m benchmarks --list` shows the commands).
bench: install
	$(PY) -m benchmarks

# ruff over the code, then mypy over the package (its settings: [tool.mypy] in
# pyproject.toml). The package ships py.typed, so its annotations are an interface.
lint: install
	$(PY) -m pip install --quiet ruff "mypy>=1.14"
	$(PY) -m ruff check captum_faithful tests benchmarks
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache docs/_build docs/_mathjax docs/_generated docs/api/generated docs/tutorials/notebooks
