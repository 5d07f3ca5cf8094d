#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.py needs on a bare CUDA machine that has torch, transformers,
# peft, pandas and pyarrow but no Ray and no network: .gpu/site.tar.xz (Ray and the few
# packages it lacks, as Python 3.12 x86-64 wheels unpacked; Ray's Java jars, RLlib, Serve, LLM
# and the dashboard's web client are left out to stay small), .gpu/tokenizer (SmolLM2's) and
# .gpu/hh.jsonl (the first HH pairs). Then, on that machine, from the repo root:
#
#   mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site &&
#   PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --tokenizer .gpu/tokenizer --data .gpu/hh.jsonl
#
#   usage: scripts/gpu_bundle.sh HH_JSONL_GZ [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/gpu_bundle.sh HH_JSONL_GZ [PYTHON_VERSION]}
PYV=${2:-3.12}
OUT=.gpu
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$OUT" "$STAGE/wheels" "$STAGE/site"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$STAGE/wheels" \
  ray==2.60.0 "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection jsonschema jsonschema-specifications referencing rpds-py tensorboardX
# Unpacked keeping each file's mode: Ray's own binaries (raylet, gcs_server) must stay executable.
.venv/bin/python - "$STAGE/site" "$STAGE"/wheels/*.whl <<'PY'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            mode = info.external_attr >> 16
            if mode:
                os.chmod(path, mode & 0o777)
PY
rm -rf "$STAGE"/site/ray/jars "$STAGE"/site/ray/rllib "$STAGE"/site/ray/serve "$STAGE"/site/ray/llm \
  "$STAGE"/site/ray/dashboard/client
tar -C "$STAGE/site" -cJf "$OUT/site.tar.xz" .
.venv/bin/python - "$OUT/tokenizer" <<'PY'
import sys
from transformers import AutoTokenizer
from dpo_ray.assets import smollm2_path
AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(sys.argv[1])
PY
python3 -c "import gzip,sys,itertools; sys.stdout.writelines(itertools.islice(gzip.open(sys.argv[1],'rt'),1024))" "$DATA" > "$OUT/hh.jsonl"
du -sh "$OUT"/*
