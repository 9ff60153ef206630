#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (run through the device tool from the repo root):
#   A. the CUDA path end to end on a built-in model: `tlq quantize` (tlq W4A8 in memory and streamed, GPTQ
#      W3A16) and `tlq eval` on the GPU, bf16 compute;
#   B. benchmarks/cost.py at Qwen2-VL-2B widths, full depth, tlq gptq / tlq / llm-compressor GPTQ;
#   C. the same at Qwen2-VL-7B widths with what time is left.
# Each stage has its own time limit (the lease is short); outputs (logs, JSON, Markdown) go to $RES, and
# after each stage into $RES/results.tgz (the device tool brings back at most 8 files).
# The machine has no registry: `.whl/` (benchmarks/gpu_wheels.sh downloads it) carries the project's pinned
# transformers / compressed-tensors / pydantic stack, `.whl/llmc/` llm-compressor's own pins; each tool
# gets its own --target directory, so llm-compressor runs on the machine's transformers, never tlq's.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
RES=${RES:-/tmp/gpu-results}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
BUDGET=${BUDGET:-540}            # seconds for the whole script
SHAPE_B=${SHAPE_B:-"--shape qwen2-vl-2b --layers 28 --num-samples 16 --image-px 448"}
SHAPE_C=${SHAPE_C:-"--shape qwen2-vl-7b --layers 28 --num-samples 8 --image-px 448"}
LLMC=${LLMC:-/tmp/llmc-py}       # a directory whose bin/python runs llm-compressor
mkdir -p "$OUT" "$RES"
pack() { tar czf "$OUT/results.tgz" -C "$RES" .; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${SKIP_INSTALL:-}" ]; then
  pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pipi /tmp/site .whl/*.whl || exit 1
  pipi /tmp/site-llmc .whl/llmc/*.whl .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_*.whl .whl/loguru*.whl || exit 1
  export PYTHONPATH="$PWD/src:/tmp/site"
  mkdir -p "$LLMC/bin"
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-llmc exec %s "$@"\n' "$(command -v "$PY")" > "$LLMC/bin/python"
  chmod +x "$LLMC/bin/python"
fi
left() { echo $(( BUDGET - SECONDS )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
  "$PY" -c "import torch, transformers, compressed_tensors as ct; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)"
  "$LLMC/bin/python" -c "import llmcompressor, transformers; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__)"
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"; pack

echo "== A: CUDA path on builtin:digits-qwen2vl ($(left) s left)"
( set -e
  timeout 100 "$PY" -m tlq quantize --model builtin:digits-qwen2vl --scheme w4a8 --method tlq --out /tmp/g-tlq --overwrite --no-resume --quiet --device "$DEVICE" --report "$RES/A-tlq-w4a8.json"
  timeout 60 "$PY" -m tlq quantize --model builtin:digits-qwen2vl --scheme w3a16 --method gptq --out /tmp/g-gptq --overwrite --no-resume --quiet --device "$DEVICE" --report "$RES/A-gptq-w3a16.json"
  timeout 100 "$PY" -m tlq quantize --model builtin:digits-qwen2vl --scheme w4a8 --method tlq --out /tmp/g-tlq-stream --stream --overwrite --no-resume --quiet --device "$DEVICE" --report "$RES/A-tlq-w4a8-stream.json"
  timeout 60 "$PY" -m tlq eval --model builtin:digits-qwen2vl --quantized /tmp/g-tlq --quantized /tmp/g-tlq-stream --quantized /tmp/g-gptq --num-samples 200 --quiet --device "$DEVICE" --report "$RES/A-eval.json"
) > "$RES/A.log" 2>&1; echo "A rc=$?"; tail -25 "$RES/A.log"; pack

echo "== B: cost at $SHAPE_B ($(left) s left)"
timeout $(( $(left) * 60 / 100 )) "$PY" benchmarks/cost.py --device "$DEVICE" $SHAPE_B --methods gptq,tlq --llmcompressor "$LLMC" --llmcompressor-methods gptq \
  --work /tmp/cost-b --out "$RES/cost-B" > "$RES/B.log" 2>&1; echo "B rc=$?"; tail -30 "$RES/B.log"; pack
rm -rf /tmp/cost-b

echo "== C: cost at $SHAPE_C ($(left) s left)"
timeout $(( $(left) - 10 )) "$PY" benchmarks/cost.py --device "$DEVICE" $SHAPE_C --methods gptq,tlq --work /tmp/cost-c --out "$RES/cost-C" > "$RES/C.log" 2>&1; echo "C rc=$?"; tail -30 "$RES/C.log"; pack
echo "done in $SECONDS s"
