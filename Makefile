# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# Every install passes constraints.txt, which pins torch to the CPU build on disk.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

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

test: lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache
