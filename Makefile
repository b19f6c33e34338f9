# Every target runs inside .venv, which `make setup` creates from the two pyproject files.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNTIME_STAMP := $(VENV)/.runtime-stamp
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: setup system-deps proto proto-check contract-image lint test image-test run bench client-dist clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./client -e '.[dev]'
	touch $(RUNTIME_STAMP) $(STAMP)

# The server and the client without the development tools: all `make run` needs, so a
# newcomer's first run installs about half as much (the full setup satisfies it too).
$(RUNTIME_STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./client -e .
	touch $(RUNTIME_STAMP)

## proto: regenerate the committed stubs in client/ferrule/v1 from protos/.
proto: $(STAMP)
	$(PY) scripts/gen_protos.py --out client

## proto-check: fail when the committed stubs differ from what the protos generate.
proto-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check client

## contract-image: move the published-contract baseline forward (after additive changes only).
contract-image: $(STAMP)
	$(PY) scripts/buf_breaking.py --write-image

lint: $(STAMP) proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/buf lint
	$(PY) scripts/buf_breaking.py
	$(PY) scripts/check_deploy.py

## system-deps: Debian packages the suite runs beside the Python ones (installs only what is
## missing): PgBouncer (transaction-mode tests), redis-sentinel (failover tests), h2load
## from nghttp2-client, buildah and debootstrap (image tests). `.ci/run` calls it; `make
## test` does not (it never needs root).
SYSTEM_PACKAGES := pgbouncer redis-sentinel nghttp2-client buildah debootstrap

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: $(STAMP)
	$(BIN)/pytest -m 'not image' $(PYTEST_ARGS)

## image-test: build the Containerfile with buildah on a Debian base made here, and run it.
image-test: $(STAMP) system-deps
	$(BIN)/pytest -m image tests/deploy $(PYTEST_ARGS)

## run: the embedded default; development mode (see server/dev_mode.py) when nothing is configured.
run: $(RUNTIME_STAMP)
	FERRULE_MIGRATE_ON_START=$${FERRULE_MIGRATE_ON_START:-1} $(PY) -m server serve \
		--dev-token-file .ferrule-dev-token

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

client-dist: $(STAMP)
	rm -rf dist/client
	$(PY) -m build --outdir dist/client client

clean:
	rm -rf $(VENV) dist build .mypy_cache .ruff_cache .pytest_cache
