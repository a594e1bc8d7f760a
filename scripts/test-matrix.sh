#!/usr/bin/env bash
# Reproduce one row of results/tested-versions.md: a fresh venv with one Python, one fairseq and one
# torch, the plugin installed the way a user of that fairseq would, then the checks that row lists.
#
# Usage: scripts/test-matrix.sh PYTHON_VERSION FAIRSEQ_SPEC [TORCH_SPEC]
#   PYTHON_VERSION  3.10, 3.12, ... (a pyenv version, or pythonX.Y on PATH)
#   FAIRSEQ_SPEC    fairseq-fixed==0.12.3.1  (installed by scripts/setup-env.sh, the fresh route), or
#                   fairseq==0.12.2          (an "existing environment": fairseq installed first, then
#                                             the plugin with `pip install -e .`, which must not touch fairseq)
#   TORCH_SPEC      default torch==2.13.0; e.g. "torch" for the newest, or
#                   "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# Env: MATRIX_DIR (default /tmp/b2t-matrix: venvs and logs, never in the repository),
#      FRESH (default 1: a new venv; 0: resume), STAGES (default "install unit train lm"), PYTEST_ARGS (extra, e.g. "-n 2").
# Prints one line per stage, "ROW | stage | ok/FAILED | detail", and appends them to $MATRIX_DIR/rows.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=${B2T_MATRIX_REPO:-$PWD}
MATRIX_DIR=${MATRIX_DIR:-/tmp/b2t-matrix}
mkdir -p "$MATRIX_DIR"
# bash reads a script while running it: run from a copy, so that editing the checkout meanwhile is safe
if [ -z "${B2T_MATRIX_COPY:-}" ]; then
  copy=$(mktemp -d "$MATRIX_DIR/scripts.XXXXXX")
  cp scripts/test-matrix.sh scripts/setup-env.sh "$copy/"
  B2T_MATRIX_COPY=$copy B2T_MATRIX_REPO=$PWD exec bash "$copy/test-matrix.sh" "$@"
fi
cd "$REPO"
PYVER=${1:?usage: scripts/test-matrix.sh PYTHON_VERSION FAIRSEQ_SPEC [TORCH_SPEC]}
FAIRSEQ_SPEC=${2:?usage: scripts/test-matrix.sh PYTHON_VERSION FAIRSEQ_SPEC [TORCH_SPEC]}
TORCH_SPEC=${3:-torch==2.13.0}
STAGES=${STAGES:-install unit train lm}
ROW="py$PYVER-$(echo "$FAIRSEQ_SPEC" | tr -c 'A-Za-z0-9.=\n' _)-$(echo "$TORCH_SPEC" | cut -d' ' -f1 | tr -c 'A-Za-z0-9.=\n' _)"
V=$MATRIX_DIR/$ROW
LOG=$MATRIX_DIR/$ROW.log
export OMP_NUM_THREADS=1 PYTHONPATH=  # the venv's own install of the plugin, not a checkout on the path

PYBIN=""
if command -v pyenv >/dev/null; then
  PYBIN=$(ls -d "$(pyenv root)/versions/$PYVER".*/bin/python 2>/dev/null | sort -V | tail -1)
fi
[ -n "$PYBIN" ] || PYBIN=$(command -v "python$PYVER") || { echo "test-matrix: error: no Python $PYVER; install it (pyenv install $PYVER)"; exit 2; }

say() { echo "$ROW | $1 | $2 | $3 | $(date -u +%F)" | tee -a "$MATRIX_DIR/rows.txt"; }
pip() { "$V/bin/python" -m pip --disable-pip-version-check "$@"; }
step() { echo "+ $*" >>"$LOG"; "$@" >>"$LOG" 2>&1; }

install_row() {
  [ "${FRESH:-1}" = 1 ] && rm -rf "$V"  # FRESH=0: resume an interrupted install (each step skips what is there)
  case "$FAIRSEQ_SPEC" in
    fairseq-fixed*)  # the fresh route, exactly as the README gives it
      PYTHON=$PYBIN TORCH_SPEC=$TORCH_SPEC FAIRSEQ_SPEC=$FAIRSEQ_SPEC B2T_REPO=$REPO step bash "$B2T_MATRIX_COPY/setup-env.sh" "$V" || return 1 ;;
    *)  # an existing fairseq environment, made first as its user would, then the plugin into it
      step "$PYBIN" -m venv "$V" || return 1
      # fairseq 0.12.2 needs omegaconf 2.0, whose metadata pip >= 24.1 refuses
      step pip install -q "pip<24.1" "setuptools<81" wheel || return 1
      # shellcheck disable=SC2086
      step pip install -q $TORCH_SPEC || return 1
      "$V/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$V/torch-pin.txt"
      # build isolation on: its build needs only setuptools, wheel and cython
      step pip install -q -c "$V/torch-pin.txt" "$FAIRSEQ_SPEC" || return 1
      step pip install -q -c "$V/torch-pin.txt" -e . -r requirements-test.txt || return 1 ;;
  esac
  # exactly one distribution owns fairseq/, and torchaudio imports or is absent
  local owners
  owners=$(pip list 2>/dev/null | grep -ciE '^fairseq(-fixed)? ')
  [ "$owners" = 1 ] || { echo "two distributions own fairseq/" >>"$LOG"; return 1; }
  if pip show torchaudio >/dev/null 2>&1; then step "$V/bin/python" -c "import torchaudio" || return 1; fi
  "$V/bin/python" -c "import sys, torch, fairseq, b2t_fairseq; print(sys.version.split()[0], 'torch', torch.__version__, 'fairseq', fairseq.__version__)" 2>>"$LOG"
}

unit_row() {
  # shellcheck disable=SC2086
  "$V/bin/python" -m pytest -q -m "not e2e" -p no:cacheprovider ${PYTEST_ARGS:--n 1} >>"$LOG" 2>&1
  local rc=$?
  grep -E "[0-9]+ (passed|failed)" "$LOG" | tail -1
  return $rc
}

toy() {  # a word-for-word toy corpus: learnable in a few updates
  "$V/bin/python" - "$1" <<'EOF'
import random, sys, os
d = sys.argv[1]; os.makedirs(d, exist_ok=True); rng = random.Random(0)
en = "the a cat dog house tree red blue big small runs sees eats".split()
de = dict(zip(en, "der ein katze hund haus baum rot blau gross klein rennt sieht isst".split()))
for split, n in (("train", 400), ("valid", 40), ("test", 40)):
    with open(f"{d}/{split}.en", "w") as fe, open(f"{d}/{split}.de", "w") as fd:
        for _ in range(n):
            s = [rng.choice(en) for _ in range(rng.randint(3, 8))]
            fe.write(" ".join(s) + "\n"); fd.write(" ".join(de[w] for w in s) + "\n")
EOF
}

TINY="--encoder-embed-dim 32 --encoder-ffn-embed-dim 64 --encoder-attention-heads 4 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 4 --encoder-layers 3 --decoder-layers 2"
COMMON="--optimizer adam --lr 5e-4 --max-tokens 1000 --max-update 20 --no-epoch-checkpoints --no-progress-bar --seed 1 --cpu --num-workers 0"

train_row() {  # every layer type: train 20 updates, then fairseq-generate decodes all 40 test sentences
  local W=$V/work-mt B=$V/bin
  rm -rf "$W"; toy "$W/raw"
  step "$B/fairseq-preprocess" --source-lang en --target-lang de --trainpref "$W/raw/train" --validpref "$W/raw/valid" \
    --testpref "$W/raw/test" --destdir "$W/bin" --joined-dictionary --workers 1 || return 1
  local done=""
  for ln in post pre b2t deepnorm admin; do
    # shellcheck disable=SC2086
    step "$B/fairseq-train" "$W/bin" --user-dir "$REPO/b2t_fairseq" --arch transformer_b2t --ln-position $ln $TINY \
      $COMMON --save-dir "$W/ck-$ln" || return 1
    step "$B/fairseq-generate" "$W/bin" --user-dir "$REPO/b2t_fairseq" --path "$W/ck-$ln/checkpoint_last.pt" \
      --beam 2 --batch-size 16 --cpu --results-path "$W/gen-$ln" || return 1
    local n; n=$(grep -c '^H-' "$W/gen-$ln/generate-test.txt")
    [ "$n" = 40 ] || { echo "$ln: $n of 40 sentences decoded" | tee -a "$LOG"; return 1; }
    done="$done $ln"
  done
  echo "translation trained and decoded 40/40:$done"
}

lm_row() {  # a B2T language model: train, fairseq-eval-lm
  local W=$V/work-lm B=$V/bin
  rm -rf "$W"; toy "$W/raw"
  step "$B/fairseq-preprocess" --only-source --trainpref "$W/raw/train.en" --validpref "$W/raw/valid.en" \
    --testpref "$W/raw/test.en" --destdir "$W/bin" --workers 1 || return 1
  step "$B/fairseq-train" "$W/bin" --task language_modeling --user-dir "$REPO/b2t_fairseq" --arch transformer_lm_b2t_tiny \
    --tokens-per-sample 32 --optimizer adam --lr 5e-4 --max-tokens 512 --max-update 20 --no-epoch-checkpoints \
    --no-progress-bar --seed 1 --cpu --num-workers 0 --save-dir "$W/ck" || return 1
  step "$B/fairseq-eval-lm" "$W/bin" --user-dir "$REPO/b2t_fairseq" --path "$W/ck/checkpoint_last.pt" \
    --tokens-per-sample 32 --max-tokens 512 --cpu || return 1
  grep -o 'Perplexity: [0-9.]*' "$LOG" | tail -1
}

for stage in $STAGES; do
  start=$(date +%s)
  if out=$("${stage}_row" 2>>"$LOG"); then status=ok; else status=FAILED; fi
  say "$stage" "$status" "$(echo "$out" | tail -1) ($(( $(date +%s) - start )) s; log $LOG)"
  [ "$stage" = install ] && [ "$status" = FAILED ] && exit 1
done
exit 0
