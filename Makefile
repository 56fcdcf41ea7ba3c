# Two commands do everything on a fresh machine (each sets up .venv first):
#   make run [MODEL=path] [PROMPT=...]   the main job: txt2img into ./outputs
#   make test                            the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast default-model eval clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build. An unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

PROMPT ?= a red circle above a blue square
# The default model draws best at guidance 4 (chosen on validation prompts, models/README.md); SD checkpoints at the usual 7.5.
CFG ?= $(if $(MODEL),7.5,4)
run: $(BIN)/.installed
	$(BIN)/diffuse txt2img "$(PROMPT)" $(if $(MODEL),--model "$(MODEL)") --cfg-scale $(CFG) --out outputs

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	scripts/install-browser.sh
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# Train the default model from scratch (about 2 h 40 min on a 2-core CPU; the shipped one
# was trained with configs/gpu and fine-tuned with configs/finetune, see models/README.md), ship it into
# models/default and measure it. Each stage resumes from its checkpoints if interrupted.
RUNS ?= runs
default-model: $(BIN)/.installed
	$(BIN)/diffuse train vae --config configs/train_vae.json --out $(RUNS)/vae
	$(BIN)/diffuse train clip --config configs/train_clip.json --out $(RUNS)/clip
	$(BIN)/diffuse train unet --config configs/train_unet.json --out $(RUNS)/unet
	$(BIN)/diffuse assemble --vae $(RUNS)/vae --clip $(RUNS)/clip --unet $(RUNS)/unet --out models/default --overwrite
	$(MAKE) eval

eval: $(BIN)/.installed
	$(BIN)/diffuse eval --cfg-scale 4 --json models/default/eval.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
