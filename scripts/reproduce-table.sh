#!/usr/bin/env bash
# The paper's WMT En-De table in one command: prepare the data, train Post-LN, Pre-LN and B2T at 6 and 18
# layers, average + evaluate each, render the table. Stop it any time and run it again: prepared stages,
# finished runs (SAVE_DIR/DONE) and existing results are skipped, interrupted training resumes.
#   scripts/reproduce-table.sh [train.sh options, e.g. --gpus 8 --max-tokens 3584]
# Environment: DATA (data-bin/wmt16_en_de_bpe32k), CKPTS (checkpoints/wmt16_en_de), RESULTS (results/wmt16_en_de),
#              SETTINGS ("transformer_post_ln:6 transformer_pre_ln:6 transformer_b2t:6 transformer_post_ln:18
#              transformer_pre_ln:18 transformer_b2t:18").
# Post-LN 18L is expected to diverge (the paper's point): its failure is recorded (SAVE_DIR/FAILED), not fatal.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${DATA:-data-bin/wmt16_en_de_bpe32k}"
CKPTS="${CKPTS:-checkpoints/wmt16_en_de}"
RESULTS="${RESULTS:-results/wmt16_en_de}"
SETTINGS="${SETTINGS:-transformer_post_ln:6 transformer_pre_ln:6 transformer_b2t:6 transformer_post_ln:18 transformer_pre_ln:18 transformer_b2t:18}"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

"$HERE/prepare-wmt16-en-de.sh" --dest "$DATA"
mkdir -p "$RESULTS"
for setting in $SETTINGS; do
  arch="${setting%%:*}"; layers="${setting##*:}"; name="${arch}_${layers}l"; save="$CKPTS/$name"
  if [ ! -f "$save/DONE" ]; then
    rm -f "$save/FAILED"
    if ! "$HERE/train.sh" "$arch" "$layers" --data "$DATA" --save-dir "$save" "$@"; then
      echo "reproduce-table: $name: training failed (see $save/train.log); going on with the others" >&2
      mkdir -p "$save" && date > "$save/FAILED"
      continue
    fi
  fi
  if [ ! -f "$RESULTS/$name.json" ]; then
    "$HERE/evaluate.sh" "$save" --data "$DATA" --name "$name" --out "$RESULTS/$name.json"
  fi
done
"$PY" -m b2t_fairseq.wmt.results_table "$RESULTS" --out "$RESULTS/table.md"
