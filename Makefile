# One command to test, one to see the demo. Both build .venv from this repo's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What serving needs and nothing more (no torch, TensorFlow or Ray): `make serve`.
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: test test-fast demo serve bench report install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on local disk; nothing may pull a newer one.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	# TF Serving's client package, for the tests: its own requirements would pull the full
	# tensorflow package beside tensorflow-cpu (already installed by dev).
	$(PY) -m pip install --quiet --no-deps 'tensorflow-serving-api>=2.21'
	touch $(STAMP)

install: $(STAMP)

# A venv that already has the development set has everything serving needs.
$(SERVE_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -f $(STAMP) || $(PY) -m pip install --quiet --upgrade pip
	test -f $(STAMP) || $(PY) -m pip install --quiet -e '.[serve]'
	touch $(SERVE_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The edit-test loop: every unit test and a core of the integration tests (the pool's
# lifecycle and failures, the server's limits and its four protocols), a few minutes on 2
# cores. CI and every commit run the whole suite (`make test`).
FAST_TESTS := tests/unit tests/integration/test_lifecycle.py \
	tests/integration/test_failures.py tests/integration/test_serve_limits.py \
	tests/integration/test_protocols.py tests/integration/test_streaming.py
test-fast: $(STAMP)
	$(PY) -m pytest -q $(FAST_TESTS)

demo: $(STAMP)
	$(PY) -m workerpool.demo

# The built-in demo model over HTTP on 127.0.0.1:8000 (KServe v2); Ctrl-C drains and stops.
serve: $(SERVE_STAMP)
	$(PY) -m workerpool serve

bench: $(STAMP)
	$(PY) bench/memory.py
	$(PY) bench/load_in.py
	$(PY) bench/server_memory.py
	$(PY) bench/many_models.py
	$(PY) bench/attach.py
	$(PY) bench/throughput.py
	$(PY) bench/load_peak.py
	$(PY) bench/serve.py
	$(PY) bench/reload.py
	$(PY) bench/protocols.py
	$(PY) bench/score.py
	$(PY) bench/overhead.py
	$(PY) bench/thread_hops.py
	$(PY) bench/round_trip_phases.py

# The benchmark report (docs/benchmarks.md): workerpool against Ray Serve, LitServe, TorchServe,
# MLServer, gunicorn --preload and multiprocessing.Pool, each installed into its own venv
# (bench/.venvs) from bench/peers/NAME/requirements.txt. Hours on a 2-core machine; it
# writes bench/results/report.*, and `bench/report.py --publish` then makes it the
# published one (docs/benchmarks.*, README.md's summary).
report: $(STAMP)
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
