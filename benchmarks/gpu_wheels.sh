#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no package registry:
# `.whl/` the project's pinned stack missing from (or older on) that machine's image, `.whl/llmc/`
# llm-compressor 0.14's own pins (it runs on the machine's transformers 5.17). Python 3.12, x86-64.
# Add `/.whl/` to .git/info/exclude; the device tool carries it with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
get .whl transformers==5.24.0 huggingface_hub==2.4.0 compressed-tensors==0.20.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 loguru==0.7.3 tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 \
  truststore==0.10.5 typer==0.29.2 safetensors==0.8.0 click==8.5.1 typing_extensions==4.16.0 hf-xet==1.8.0 \
  shellingham==1.5.4 regex==2026.11.19
get .whl/llmc llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl
