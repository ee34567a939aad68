# rankstream: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test proto lint clean bench bench-gpu

# CPU machines get torch==2.13.0 (a CPU build, from local disk where available) before anything
# else can ask for torch; on a machine with CUDA the range in pyproject.toml takes a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e '.[cpu,langchain,dev]'
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)  ## regenerate the Python stubs from protos/ (never edit them by hand)
	$(PY) -m grpc_tools.protoc -I protos --python_out=client --pyi_out=client --grpc_python_out=client \
		protos/rankstream/v1/*.proto

demo: $(STAMP)
	$(PY) -m rankstream_server.cli.demo

NODE_STAMP := tests/node/node_modules/.installed-stamp

# The Node.js client test needs its packages; machines without node/npm skip that one test.
$(NODE_STAMP): tests/node/package-lock.json
	if command -v npm >/dev/null 2>&1; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed-stamp; fi

test: $(STAMP)
	-$(MAKE) --no-print-directory $(NODE_STAMP)
	$(PY) -m pytest -q

# Issue 7's benchmarks, printed as tables (see benchmarks/RESULTS.md). BENCH_ARGS passes flags,
# e.g. `make bench BENCH_ARGS=--quick`. bench-gpu needs a CUDA machine whose Python already has the
# server's packages (benchmarks/gpu.sh lists what is missing); it does not build .venv.
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

bench-gpu:
	benchmarks/gpu.sh $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check server client/rankstream/*.py tests benchmarks

clean:
	rm -rf $(VENV) .cache
