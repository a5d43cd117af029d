# The two commands the README names: `make run` and `make test`.
# Everything installs into .venv from uv.lock; uv itself comes from PyPI when missing.
UV_VERSION := 0.13.9
UV := python3 -m uv

.PHONY: venv run test lint typecheck pytest bench clean

venv:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	@$(UV) sync --frozen --quiet

run: venv
	$(UV) run --frozen tollway quickstart

test: venv lint typecheck pytest

lint:
	$(UV) run --frozen ruff check src tests bench

typecheck:
	$(UV) run --frozen mypy

pytest:
	$(UV) run --frozen pytest -q

bench: venv
	$(UV) run --frozen python bench/run.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache data
