# pneumoscreen: `make run` (embedded default) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip

.PHONY: run test test-fast docs install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Listener + workers + in-process broker + SQLite under ./pneumoscreen-data, port 11112.
run: install
	$(VENV)/bin/pneumoscreen run

## Needs Redis and PostgreSQL on 127.0.0.1, dcmtk and Orthanc (see README).
test: install
	$(VENV)/bin/python -m pytest

## The fast lane: every test that starts no process or server and trains no network (Redis and
## PostgreSQL are still needed).
test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow"

## The documentation site into build/site/ (mkdocs-material), warnings as errors.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) pneumoscreen-data .pytest_cache
