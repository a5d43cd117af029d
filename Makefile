# The two commands the README names: `make run` and `make test`.
# Everything installs into .venv from uv.lock; uv itself comes from PyPI when missing.
UV_VERSION := 0.13.9
UV := python3 -m uv

.PHONY: venv compile clean-compiled run test lint typecheck pytest bench clean

# The data plane's hot path, compiled with mypyc (it is mypy --strict clean): about
# half the CPU per proxied request. The .py files stay the source of truth; an
# import of tollway refuses a compiled module older than its source.
# Not router.py / routing_trie.py (the compiled module crashes on import with mypyc
# 1.x) nor limits/multi.py (its Windows subclasses tuple, which mypyc cannot compile).
COMPILED := \
	tollway/gateway/http11.py tollway/gateway/framing.py tollway/gateway/forwarded.py \
	tollway/gateway/context.py tollway/gateway/exchange.py tollway/gateway/server.py \
	tollway/gateway/pipeline.py tollway/gateway/attempts.py \
	tollway/upstream/connection.py tollway/upstream/pool.py tollway/upstream/cluster.py \
	tollway/upstream/balancers.py tollway/upstream/circuit.py tollway/upstream/health.py \
	tollway/upstream/stats.py \
	tollway/limits/gcra.py tollway/limits/memory.py tollway/limits/windows.py \
	tollway/limits/decision.py tollway/limits/concurrency.py tollway/limits/stats.py \
	tollway/limits/service.py tollway/limits/redis_store.py tollway/limits/resp.py tollway/plugins/rate_limit_engine.py \
	tollway/plugins/key_auth_engine.py tollway/observability/request_counts.py tollway/gateway/ids.py \
	tollway/plugins/access_log_engine.py tollway/plugins/cors_engine.py tollway/plugins/request_id_engine.py
# Compiled code is checked against the types of everything it imports: any source
# change (or a change of this list) rebuilds.
SOURCES := $(shell find src/tollway -name '*.py')

venv:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	@$(UV) sync --frozen --quiet

src/.compiled: $(SOURCES) uv.lock Makefile
	@$(MAKE) --no-print-directory venv
	@echo "compiling the data plane's hot path (mypyc)..."
	@cd src && ../.venv/bin/mypyc $(COMPILED) > ../.venv/mypyc.log 2>&1 \
		|| (tail -30 ../.venv/mypyc.log; exit 1)
	@# setuptools keeps a .so whose generated C did not change: mark them all as
	@# built from the sources they now match.
	@find src/tollway -name '*.so' -exec touch {} +
	@touch $@

compile: src/.compiled

clean-compiled:
	rm -rf src/build src/.compiled src/*__mypyc*.so
	find src/tollway -name '*.so' -delete

run: venv compile
	$(UV) run --frozen tollway quickstart

test: venv compile lint typecheck pytest

lint:
	$(UV) run --frozen ruff check src tests bench

typecheck:
	$(UV) run --frozen mypy

pytest:
	$(UV) run --frozen pytest -q

bench: venv compile
	$(UV) run --frozen python bench/run.py

clean: clean-compiled
	rm -rf .venv .mypy_cache .ruff_cache data
