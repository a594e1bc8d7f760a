#!/usr/bin/env bash
# Average a run's last checkpoints and score newstest2010-2016 (beam 4, lenpen 0.6 on 2014, 1.0 otherwise;
# SacreBLEU and tokenized compound-split BLEU), one JSON per run:
#   scripts/evaluate.sh SAVE_DIR [--data DIR] [--name NAME] [--out FILE] [--last N] [--updates]
#                                [-- more b2t-wmt-evaluate options]
# --last N: average the last N epoch checkpoints (default 10); --updates: the last N update checkpoints.
# An existing average (SAVE_DIR/checkpoint_avg_lastN.pt) is reused; the result JSON is rewritten.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
[ $# -ge 1 ] || { echo "usage: scripts/evaluate.sh SAVE_DIR [--data DIR] [--name NAME] [--out FILE] [--last N] [--updates] [-- ...]" >&2; exit 2; }
SAVE="$1"; shift
DATA="${B2T_WMT_DATA:-data-bin/wmt16_en_de_bpe32k}"; NAME="$(basename "$SAVE")"; OUT=""; LAST=10; KIND=epoch
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --last) LAST="$2"; shift 2 ;;
    --updates) KIND=update; shift ;;
    --) shift; break ;;
    *) echo "evaluate.sh: error: unknown option $1; see the usage at the top of scripts/evaluate.sh" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-results/wmt16_en_de/$NAME.json}"
AVG="$SAVE/checkpoint_avg_${KIND}_last$LAST.pt"
if [ ! -f "$AVG" ]; then
  "$PY" -m b2t_fairseq.commands.average_checkpoints --inputs "$SAVE" "--num-$KIND-checkpoints" "$LAST" --output "$AVG"
fi
exec "$PY" -m b2t_fairseq.wmt.evaluate --data "$DATA" --checkpoint "$AVG" --name "$NAME" --out "$OUT" "$@"
