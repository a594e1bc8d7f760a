#!/usr/bin/env bash
# Average the last N epoch checkpoints of a run (the paper: 10):
#   scripts/average.sh SAVE_DIR [N] [OUTPUT]     (default N=10, OUTPUT=SAVE_DIR/checkpoint_avg_lastN.pt)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
[ $# -ge 1 ] || { echo "usage: scripts/average.sh SAVE_DIR [N] [OUTPUT]" >&2; exit 2; }
SAVE="$1"; N="${2:-10}"; OUT="${3:-$SAVE/checkpoint_avg_last$N.pt}"
exec "$PY" -m b2t_tools.commands.average_checkpoints --inputs "$SAVE" --num-epoch-checkpoints "$N" --output "$OUT"
