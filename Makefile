# selfsup — `make demo` trains SimCLR on the embedded digits data; `make test` runs the tests.
# Both create .venv (Python 3.11) and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-selfsup

export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1
export GLOO_SOCKET_IFNAME ?= lo

.PHONY: install demo test test-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned builds (see README: other versions download GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/selfsup run configs/simclr.yaml

# pytest exit code 5 means "no tests collected": not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The same suite without the end-to-end tests marked slow (clusters, several commands each).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) outputs .pytest_cache
