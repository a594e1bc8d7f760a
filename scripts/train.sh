#!/usr/bin/env bash
# Train on WMT'16 En-De with the paper's hyperparameters:
#   scripts/train.sh ARCH LAYERS [--gpus N] [--nodes N] [--max-tokens N] [--data DIR] [--save-dir DIR]
#                    [--launcher auto|spawn|torchrun|slurm] [--cpu-procs N] [--dry-run] [--force] [-- fairseq flags]
# ARCH: transformer_b2t | transformer_post_ln | transformer_pre_ln | transformer_deepnorm | transformer_admin;
# LAYERS: 6 or 18 (per stack; other depths add --encoder-layers/--decoder-layers).
# --update-freq is computed so that an update holds 458,752 target tokens. See the README, "Reproducing WMT En-De".
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" -m b2t_tools.wmt.train "$@"
