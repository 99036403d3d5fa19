#!/usr/bin/env bash
# The main job: install, then run the default recipe on the embedded teacher and check its result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline}
zoo fit --config configs/recipes/fisher_svd_repair.yaml "$@"
