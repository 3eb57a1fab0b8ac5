# Set-up is part of every target: a fresh clone needs only `make demo`, `make test` or `make check`.
# Every install passes constraints.txt, which pins torch to the CPU build on disk.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test check lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	mkdir -p out
	$(BIN)/actsparse convert digits-cnn -o out/digits-cnn --overwrite

lint: $(VENV)/.installed
	$(BIN)/ruff check actsparse_deploy tests tools
	$(BIN)/mypy

# the everyday loop: every test but those marked slow (MiniLM end to end, real processes)
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# everything, slow tests included: what CI runs (.ci/run)
check: lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache
