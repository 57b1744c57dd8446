#!/usr/bin/env bash
# The GPU check of issue 4, in one command on the device machine (prepare with
# `python -m benchmarks.device_kit` here; run with carry [".device-kit"]):
#   1. the project's pinned transformers / sentence-transformers go on top of the image's torch;
#   2. the CUDA tests (fp16 on CUDA against fp32 on the CPU, through the runtime);
#   3. benchmarks/embed.py on CUDA: random-initialised MiniLM, fp16, batch 256, 64 tokens, the
#      model-only ceiling against the runtime's paths.
# Everything it prints and writes lands in $OUT (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device-kit/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
export PGML_MINILM_TOKENIZER="$PWD/.device-kit/minilm-tokenizer"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, sentence_transformers as st; print(torch.__version__, torch.cuda.is_available(), transformers.__version__, st.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
# -o addopts=: the suite's Postgres and proxy plugins need packages the image lacks; these tests do not.
timeout 200 python3 -m pytest -o addopts= -p no:cacheprovider -m gpu -q -rA tests/test_runtime_lifecycle.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout 300 python3 -m benchmarks.embed --device cuda --random-init --batch 256 --tokens 64 2>&1 | tail -40 | tee "$OUT/embed-cuda.log"
cp benchmarks/results/embed-cuda.json benchmarks/results/embed-cuda.md "$OUT/" 2>/dev/null
exit 0
