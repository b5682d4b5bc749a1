# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch, installed before the project so nothing pulls a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo demo-rollback test test-unit test-integration validate bench stop clean

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

bench: install
	$(BIN)/python -m bench.router_overhead
	$(BIN)/python -m bench.rollback

test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

test-unit: install
	$(BIN)/python -m pytest tests/unit -q

test-integration: install
	$(BIN)/python -m pytest tests/integration -q

validate: install
	$(BIN)/rollout validate serve_config.yaml

# Removes the demo app; stops the Ray head only if `make demo` started it.
stop:
	bash scripts/demo.sh --stop

clean:
	rm -rf $(VENV) .ray-demo .pytest_cache
