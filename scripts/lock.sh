#!/usr/bin/env bash
# Re-lock constraints.txt: what a fresh, unconstrained install resolves today (torch left out).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
python3 -m venv "$venv"
PYTHON="$venv/bin/python" ZOO_CONSTRAINTS=none bash scripts/setup.sh
{
  echo "# What a fresh install resolved on $(date -u +%Y-%m-%d), and what CI tests: scripts/setup.sh installs with it."
  echo "# torch is left out on purpose: setup.sh keeps an installed torch (e.g. your CUDA build) or installs torch==2.13.0."
  echo "# Regenerate: bash scripts/lock.sh (a fresh venv, an unconstrained install, pip freeze)."
  echo "# python: $("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -viE "^(torch|nvidia-[a-z0-9-]*|triton)==" | grep -v "^-e"
} > constraints.txt
rm -rf "$venv"
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
