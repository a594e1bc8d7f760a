#!/usr/bin/env bash
# Create .venv and install everything b2t-fairseq needs, in the order that works:
#   1. torch first (otherwise fairseq's dependency pulls a multi-GB CUDA build),
#   2. fairseq's build requirements, 3. fairseq-fixed built from source against that torch
#   (--no-build-isolation), 4. the rest, 5. this package in editable mode.
# Usage: scripts/setup-env.sh [VENV_DIR]      (default: .venv; Python >= 3.11, the pins' floor)
# Which torch build (TORCH_SPEC, passed to pip as is):
#   CPU only:  TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   CUDA:      TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   default "torch==2.13.0": from PyPI that is the CUDA build on Linux x86_64 (several GB)
# An environment that already has fairseq and torch (e.g. upstream fairseq 0.12.2 on Python 3.8-3.10)
# does not need this script: `pip install -e .` there (see results/tested-versions.md).
set -euo pipefail
cd "${B2T_REPO:-$(dirname "$0")/..}"  # test-matrix.sh runs a copy of this script
VENV=${1:-${B2T_VENV:-.venv}}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FAIRSEQ_SPEC=${FAIRSEQ_SPEC:-fairseq-fixed==0.12.3.1}

PYCHK=$PY; [ -x "$VENV/bin/python" ] && PYCHK=$VENV/bin/python
"$PYCHK" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup-env.sh: error: $("$PYCHK" -V 2>&1) is older than 3.11, which the pinned numpy and regex need; set PYTHON=python3.11 (or newer) and a new VENV_DIR, or install into an existing fairseq environment with pip install -e ." >&2
  exit 2
}
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
# fairseq requires torchaudio, and pip takes the newest one even when it was built for another torch
# (torchaudio 2.11 beside torch 2.13 fails at `import torchaudio`). fairseq needs it only for its
# speech tasks: keep a torchaudio that loads, remove one that cannot.
if "$VENV/bin/python" -m pip show torchaudio >/dev/null 2>&1 && ! have torchaudio; then
  echo "[setup] removing torchaudio $("$VENV/bin/python" -m pip show torchaudio | sed -n 's/^Version: //p'): it does not load with this torch (no release matches it); fairseq needs it only for speech tasks"
  pip uninstall -q -y torchaudio
fi
pip install -q -r requirements.txt -r requirements-test.txt
pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, fairseq, b2t_fairseq; print('[setup] ok: torch', torch.__version__, '| fairseq', fairseq.__version__, '| b2t_fairseq', b2t_fairseq.__version__)"
