# Two commands do everything on a fresh machine (each sets up .venv first):
#   make run MODEL=path/to/model   the main job
#   make test                      the test suite
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

run: $(BIN)/.installed
ifndef MODEL
	@echo "usage: make run MODEL=<diffusers folder | model.safetensors | model.ckpt>"; \
	 echo "(the shipped default model and txt2img arrive with the training and generation work)"; exit 2
else
	$(BIN)/diffuse info "$(MODEL)"
endif

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
