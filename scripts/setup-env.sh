#!/usr/bin/env bash
# Create .venv and install everything b2t-fairseq needs, in the order that works:
#   1. torch first (otherwise fairseq's dependency pulls a multi-GB CUDA build),
#   2. fairseq's build requirements, 3. fairseq-fixed built from source against that torch
#   (--no-build-isolation), 4. the rest, 5. this package in editable mode.
# Usage: scripts/setup-env.sh [VENV_DIR]      (default: .venv)
# GPU users: set TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${B2T_VENV:-.venv}}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FAIRSEQ_SPEC=${FAIRSEQ_SPEC:-fairseq-fixed==0.12.3.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
have() { "$VENV/bin/python" -c "import $1" >/dev/null 2>&1; }

pip install -q --upgrade "pip>=24.1" "setuptools<81" wheel
if ! have torch; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip install -q $TORCH_SPEC
fi
pip install -q numpy==2.3.5 Cython==3.1.8 ninja
if ! have fairseq; then
  echo "[setup] building $FAIRSEQ_SPEC from source (about 2-3 minutes on 2 cores)"
  pip install -q --no-build-isolation "$FAIRSEQ_SPEC"
fi
pip install -q -r requirements.txt -r requirements-test.txt
pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, fairseq, b2t_fairseq; print('[setup] ok: torch', torch.__version__, '| fairseq', fairseq.__version__, '| b2t_fairseq', b2t_fairseq.__version__)"
