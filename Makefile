# Two commands do everything on a fresh machine (each sets up .venv first):
#   make run [MODEL=path] [PROMPT=...]   the main job: txt2img into ./outputs
#   make test                            the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build. An unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

PROMPT ?= a red circle above a blue square
run: $(BIN)/.installed
	$(BIN)/diffuse txt2img "$(PROMPT)" $(if $(MODEL),--model "$(MODEL)") --out outputs

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
