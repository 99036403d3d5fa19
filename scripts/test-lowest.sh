#!/usr/bin/env bash
# The oldest stack zoo supports: pyproject.toml's floors (constraints-lowest.txt) in a venv of its own,
# running the tests that reach into those libraries' APIs: every transformers model, cache and generation
# path (EigenAttention's compressed KV cache, the hologram sampler, surgery, the fast step, the teacher-logit
# cache), LightningCLI parsing and checkpoint routing, and the callbacks' and the module's hooks. The rest of
# the suite is the zoo's own arithmetic, which these versions do not change; scripts/test.sh runs all of it on
# today's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ZOO_LOWEST_VENV:-.venv-lowest}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
PYTHON="$venv/bin/python" ZOO_CONSTRAINTS=constraints-lowest.txt bash scripts/setup.sh
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
"$venv/bin/python" -c "import transformers, lightning; print(f'lowest stack: transformers {transformers.__version__}, lightning {lightning.__version__}')"
"$venv/bin/python" -m pytest -m "not gpu and not slow" -q \
  tests/test_eigen_attention.py tests/test_data.py tests/test_targets_surgery.py tests/test_fast_step.py \
  tests/test_teacher_logit_cache.py tests/test_cli.py tests/test_reliability.py tests/test_module_state.py \
  tests/test_contract.py tests/test_kfac.py tests/test_lr_decay.py "$@"
