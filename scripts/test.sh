#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
# DPO_RAY_DATA_DIR points at the HH-RLHF file (default: ../shared/data beside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DPO_RAY_DATA_DIR=${DPO_RAY_DATA_DIR:-$(cd .. && pwd)/shared/data}
export RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
