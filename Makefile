# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch, installed before the project so nothing pulls a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo demo-worse demo-rollback lint fmt typecheck test test-unit test-integration test-multinode test-headloss test-regions demo-regions validate kuberay lock bench stop clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	bash scripts/demo.sh

# Needs the app from `make demo` running: v2 fails half its requests, the canary rolls back.
demo-rollback: install
	bash scripts/demo.sh --rollback

# Needs the app from `make demo` running: v2 is hot-patched to a worse ranking; the A/B test on
# the users' clicks says so and the canary is rolled back by itself.
demo-worse: install
	bash scripts/demo.sh --worse

bench: install
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.rollback

# ruff (lint and format check) and mypy, as CI runs them before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

# tests/multinode starts its own multi-node cluster, tests/headloss a head whose GCS keeps
# its tables in a redis-server of its own (Debian `redis-server`), tests/regions two Ray
# clusters of its own, so each runs in a pytest process of its own.
# --durations: the slowest tests in the log, to keep CI's time in view.
test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=25 --ignore=tests/multinode --ignore=tests/headloss --ignore=tests/regions
	$(BIN)/python -m pytest tests/multinode -q -p no:cacheprovider --durations=5
	$(BIN)/python -m pytest tests/headloss -q -p no:cacheprovider --durations=5
	$(BIN)/python -m pytest tests/regions -q -p no:cacheprovider --durations=5

test-multinode: install
	$(BIN)/python -m pytest tests/multinode -q

test-headloss: install
	$(BIN)/python -m pytest tests/headloss -q

# Two independent local Ray clusters ("regions") and `rollout waves` across them.
test-regions: install
	$(BIN)/python -m pytest tests/regions -q

# The waves story on three local Ray clusters (one per region): the third region's v2 is
# faulty, so waves 1 and 2 succeed and the waves halt there; prints a summary (bench/waves.py).
demo-regions: install
	$(BIN)/python -m bench.waves --regions 3

test-unit: install
	$(BIN)/python -m pytest tests/unit -q

test-integration: install
	$(BIN)/python -m pytest tests/integration -q

validate: install
	$(BIN)/rollout validate serve_config.yaml --all-regions

# Regenerate the KubeRay manifest from serve_config.yaml + configs/regions/us-east-1.yaml.
kuberay: install
	$(BIN)/rollout kuberay serve_config.yaml --region us-east-1 -o cluster/kuberay/rayservice.yaml

# requirements.lock: what every cluster node installs (`--require-hashes --no-deps`), each
# package pinned with its sha256 hashes: pyproject.toml's runtime dependencies, its `mlflow`
# extra (`mlflow:` artifacts) and the head's autoscaler libraries, resolved by uv for Linux
# x86_64 and Python 3.11. Left out: torch (each node installs it by version after the lock, the
# CPU or the CUDA build) and the CUDA libraries only PyPI's torch pulls in (a first pass finds
# their names); torch's pin still constrains the resolution, so its other dependencies are
# locked at versions it accepts. Needs the index.
UV_VERSION   := 0.13.9
LOCK_EXTRA   := 'boto3>=1.34' 'google-api-python-client>=2.100' 'google-auth>=2.20'
LOCK_COMPILE := $(BIN)/uv pip compile pyproject.toml - --extra mlflow --quiet --generate-hashes \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command 'make lock' --no-emit-package torch
lock: install
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	cp requirements.lock $(VENV)/lock-pass1.txt 2>/dev/null || true
	printf '%s\n' $(LOCK_EXTRA) $(TORCH) | $(LOCK_COMPILE) -o $(VENV)/lock-pass1.txt
	printf '%s\n' $(LOCK_EXTRA) $(TORCH) | $(LOCK_COMPILE) -o requirements.lock $$(sed -nE \
		's/^(triton|nvidia-[a-z0-9.-]+|cuda-[a-z0-9.-]+)==.*/--no-emit-package \1/p' $(VENV)/lock-pass1.txt)

# Regenerate docs/openapi.json from the pydantic models in app/serving/openapi.py
# (tests/unit/test_openapi.py fails while it is out of date).
.PHONY: openapi
openapi: install
	$(BIN)/python -m app.serving.openapi -o docs/openapi.json

# Removes the demo app; stops the Ray head only if `make demo` started it.
stop:
	bash scripts/demo.sh --stop

clean:
	rm -rf $(VENV) .ray-demo .pytest_cache
