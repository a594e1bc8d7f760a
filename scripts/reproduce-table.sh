#!/usr/bin/env bash
# The paper's WMT En-De table in one command: prepare the data, train Post-LN, Pre-LN and B2T at 6 and 18
# layers, average + evaluate each, render the table. Stop it any time and run it again: prepared stages,
# finished runs (SAVE_DIR/DONE) and current results are skipped, interrupted training resumes. A result is
# current only when it was built from the average of the run's last checkpoints as they are now (names and
# content fingerprints): one left by a progress check (scripts/evaluate.sh during training) is rebuilt.
#   scripts/reproduce-table.sh [train.sh options, e.g. --gpus 8 --max-tokens 3584]
# Environment: DATA (data-bin/wmt16_en_de_bpe32k), CKPTS (checkpoints/wmt16_en_de), RESULTS (results/wmt16_en_de),
#              SETTINGS ("transformer_post_ln:6 transformer_pre_ln:6 transformer_b2t:6 transformer_post_ln:18
#              transformer_pre_ln:18 transformer_b2t:18"),
#              PREPARE_ARGS (more b2t-wmt-prepare options, shell-quoted, e.g. "--mirror URL --work DIR"),
#              EVAL_ARGS (more scripts/evaluate.sh options, shell-quoted, e.g. "--last 5 -- --fp16").
# Post-LN 18L is expected to diverge (the paper's point): its failure is recorded (SAVE_DIR/FAILED), not fatal.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${DATA:-data-bin/wmt16_en_de_bpe32k}"
CKPTS="${CKPTS:-checkpoints/wmt16_en_de}"
RESULTS="${RESULTS:-results/wmt16_en_de}"
SETTINGS="${SETTINGS:-transformer_post_ln:6 transformer_pre_ln:6 transformer_b2t:6 transformer_post_ln:18 transformer_pre_ln:18 transformer_b2t:18}"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

for var in PREPARE_ARGS EVAL_ARGS; do
  eval "${var%_ARGS}=(${!var:-})" 2>/dev/null || {
    echo "reproduce-table.sh: error: $var cannot be split into words (unbalanced quotes?); fix its quoting, e.g. $var=\"--last 5 -- --generate-args '--max-len-b 50'\"" >&2
    exit 2; }
done

"$HERE/prepare-wmt16-en-de.sh" --dest "$DATA" "${PREPARE[@]}"
mkdir -p "$RESULTS"
for setting in $SETTINGS; do
  arch="${setting%%:*}"; layers="${setting##*:}"; name="${arch}_${layers}l"; save="$CKPTS/$name"
  if [ ! -f "$save/DONE" ]; then
    rm -f "$save/FAILED"
    if ! "$HERE/train.sh" "$arch" "$layers" --data "$DATA" --save-dir "$save" "$@"; then
      echo "reproduce-table: $name: training failed (see $save/train.log); going on with the others" >&2
      mkdir -p "$save" && date > "$save/FAILED"
      if [ -f "$RESULTS/$name.json" ]; then  # an earlier progress check's score must not stand for this run
        mv -f "$RESULTS/$name.json" "$RESULTS/$name.json.stale"
        echo "reproduce-table: $name: moved its earlier result to $RESULTS/$name.json.stale" >&2
      fi
      continue
    fi
  fi
  # --reuse: the average is rebuilt when the last checkpoints changed, the result when the average did
  "$HERE/evaluate.sh" "$save" --data "$DATA" --name "$name" --out "$RESULTS/$name.json" --reuse "${EVAL[@]}"
done
"$PY" -m b2t_tools.wmt.results_table "$RESULTS" --out "$RESULTS/table.md"
