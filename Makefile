# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

# torch==2.13.0 is pinned first: a CPU build on this kind of machine; an open range
# could pull a multi-GB CUDA build. On a GPU node use `pip install -e .` directly.
$(BIN)/vpo: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/vpo

install: $(BIN)/vpo

demo: install
	$(BIN)/vpo demo --out $(DEMO_OUT)

# Headless Chromium (Debian package) lets the tests open the HTML report like a person would.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the report browser test will be skipped"

# buildah (rootless-free OCI builds) and busybox (the stand-in base's wget) for tests/test_image.py.
image-tools:
	@(command -v buildah >/dev/null 2>&1 && command -v busybox >/dev/null 2>&1) || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah busybox-static >/dev/null) \
	  || echo "buildah could not be installed: the image build test will be skipped"

test: install browser image-tools
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

.PHONY: install browser image-tools demo test
