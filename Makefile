# Everything a fresh machine needs, from Python 3.11 alone. `make demo` runs the main job; `make test` the test suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned first so pip takes the builds this project is tested with.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-all lint bench clean

$(BIN)/rclip: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,spacy-model,lookups]'
	touch $(BIN)/rclip

install: $(BIN)/rclip

demo: install
	$(BIN)/rclip demo --out runs/demo --force

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ''

lint: install
	$(BIN)/ruff check rclip_core rclip_cli tests benchmarks

bench: install
	$(BIN)/python benchmarks/zeroshot_gtbox.py --quick
	$(BIN)/python benchmarks/text_embed.py --quick
	$(BIN)/python benchmarks/vocab_build.py --quick
	$(BIN)/python benchmarks/rpn_proposals.py --quick

clean:
	rm -rf $(VENV) runs build *.egg-info
