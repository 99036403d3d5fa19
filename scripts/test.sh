#!/usr/bin/env bash
# The test suite: install, then run every CPU test (the slow ones load the real embedded teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python3 -m pytest -m "not gpu" -q "$@"
