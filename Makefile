# `make demo` and `make test` each create .venv if missing, install with the pinned constraints, then run.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.memrl-installed

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,optuna,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m memrl.train_agent --config bench

# Two single-threaded pytest workers, one test file each at a time (module fixtures stay in one
# process), longest files first (tests/conftest.py): on 2 cores faster than one two-threaded
# process, and never oversubscribed.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-slow: install
	$(PY) -m pytest -q -m slow

# mypy checks envs/ and agents/ as the memrl.envs and memrl.agents users import (and research/): a tree of links in
# build/typecheck lays them out as the installed package does (pyproject's package-dir).
lint: install
	$(VENV)/bin/ruff check .
	rm -rf build/typecheck && mkdir -p build/typecheck/memrl
	ln -s $(CURDIR)/memrl/* $(CURDIR)/agents $(CURDIR)/envs build/typecheck/memrl/
	ln -s $(CURDIR)/research build/typecheck/research
	cd build/typecheck && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p memrl -p research

bench: install
	$(PY) bench/bench_finetune.py
	$(PY) bench/bench_nn_search.py
	$(PY) bench/bench_metrics.py

clean:
	rm -rf $(VENV) build *.egg-info
