#!/usr/bin/env bash
# Average a run's last checkpoints and score newstest2010-2016 (beam 4, lenpen 0.6 on 2014, 1.0 otherwise;
# SacreBLEU and tokenized compound-split BLEU), one JSON per run:
#   scripts/evaluate.sh SAVE_DIR [--data DIR] [--name NAME] [--out FILE] [--last N] [--updates] [--reuse]
#                                [-- more b2t-wmt-evaluate options]
# --last N: average the last N epoch checkpoints (default 10); --updates: the last N update checkpoints.
# The average (SAVE_DIR/checkpoint_avg_{epoch,update}_lastN.pt) records the checkpoints it came from (names,
# epochs, updates, content fingerprints): it is reused only while the last N checkpoints are exactly those,
# and rebuilt when training has saved newer ones (a progress check never leaks into the final table).
# The result JSON records the same provenance; it is rewritten, or with --reuse kept when it was built from
# the same average content, data and settings (scripts/reproduce-table.sh uses --reuse).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
[ $# -ge 1 ] || { echo "usage: scripts/evaluate.sh SAVE_DIR [--data DIR] [--name NAME] [--out FILE] [--last N] [--updates] [--reuse] [-- ...]" >&2; exit 2; }
SAVE="$1"; shift
DATA="${B2T_WMT_DATA:-data-bin/wmt16_en_de_bpe32k}"; NAME="$(basename "$SAVE")"; OUT=""; LAST=10; KIND=epoch; REUSE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data|--name|--out|--last)
      [ $# -ge 2 ] || { echo "evaluate.sh: error: $1 needs a value; see the usage at the top of scripts/evaluate.sh" >&2; exit 2; }
      case "$1" in --data) DATA="$2" ;; --name) NAME="$2" ;; --out) OUT="$2" ;; --last) LAST="$2" ;; esac
      shift 2 ;;
    --updates) KIND=update; shift ;;
    --reuse) REUSE=(--skip-if-current); shift ;;
    --) shift; break ;;
    *) echo "evaluate.sh: error: unknown option $1; see the usage at the top of scripts/evaluate.sh" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-results/wmt16_en_de/$NAME.json}"
case "$LAST" in
  ''|*[!0-9]*) LAST_OK=0 ;;
  *) LAST_OK=$(( 10#$LAST >= 1 )) ;;
esac
[ "$LAST_OK" = 1 ] || { echo "evaluate.sh: error: --last $LAST is not a number of checkpoints; pass --last N with N >= 1 (the paper: 10)" >&2; exit 2; }
LAST=$(( 10#$LAST ))
AVG="$SAVE/checkpoint_avg_${KIND}_last$LAST.pt"
"$PY" -m b2t_tools.commands.average_checkpoints --inputs "$SAVE" "--num-$KIND-checkpoints" "$LAST" --output "$AVG" \
  --reuse-if-current
exec "$PY" -m b2t_tools.wmt.evaluate --data "$DATA" --checkpoint "$AVG" --name "$NAME" --out "$OUT" "${REUSE[@]}" "$@"
