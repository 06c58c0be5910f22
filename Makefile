# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test mutation install system-deps clean

demo: $(STAMP)
	$(BIN)/workbench demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

install: $(STAMP)

# Mutation testing of the numerical core with the fast tests ([tool.mutmut] in pyproject.toml); prints the
# score and every surviving mutant. `$(BIN)/mutmut show NAME` shows one; `mutmut browse` all of them.
# One OpenMP thread: mutmut forks each mutant from a process whose torch has started its thread pool, and
# a forked child of a running libgomp pool hangs in its first parallel region.
mutation: $(STAMP)
	rm -rf mutants
	WORKBENCH_TEST_EXECUTOR=sequential OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

# Reinstall only when the project's requirements change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real Fashion-MNIST for the torchvision loader's offline path (Debian's package, ~30 MB).
system-deps:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "note: could not install dataset-fashion-mnist; its test will say how"; }
	@# Debian's Chromium for the real-browser notebook test (Playwright drives it; no browser download).
	@test -x /usr/bin/chromium || { \
	  command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "note: could not install chromium; tests/test_browser.py will fail saying so"; }

clean:
	rm -rf $(VENV) .pytest_cache
