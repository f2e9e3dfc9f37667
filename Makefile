# Two commands on a fresh machine: `make run` (the service) and `make test` (the suite).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch on machines without an NVIDIA GPU (a bare `torch` would pull CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run generate test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The main job: the HTTP service on the tiny profile (CPU, nothing downloaded).
run: setup
	$(VENV)/bin/vidgen-serve serve --host $(HOST) --port $(PORT)

# One video in-process, without Ray.
generate: setup
	$(VENV)/bin/vidgen-serve generate --prompt "一只橘猫在樱花树下追逐蝴蝶" --style realistic \
		--duration 8 --resolution 1080p --output cat.mp4

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/pipeline_stages.py

clean:
	rm -rf $(VENV) .pytest_cache

# A bounded headless load run against the local tiny service (started, waited for, stopped
# here): var/loadtest/<scenario>-<time>/ gets Locust's CSVs, replicas.csv and report.html
# (+ report.png). Exits 1 when a request failed (shed 429/503 answers are not failures).
# SCENARIO=autoscale fails unless the Denoiser scales up under load and back down after it.
SCENARIO ?= mixed
.PHONY: loadtest
loadtest: setup
	$(PY) -m loadtests.run --scenario $(SCENARIO)
