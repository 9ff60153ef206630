#!/usr/bin/env bash
# A separate venv for llm-compressor, the peer tool benchmarks/cost.py compares against. It pins its own
# torch (>=2.10,<=2.14.0) and transformers (5.15-5.17), so it never shares the project's venv or tests.
# torch 2.13.0 (CPU) installs from this machine's local disk; the rest comes from PyPI.
set -euo pipefail
VENV=${1:-.venv-llmcompressor}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q llmcompressor==0.14.0.1 pillow
"$VENV/bin/python" -c "import llmcompressor, torch, transformers, compressed_tensors as ct; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)"
