#!/usr/bin/env bash
# Rebuild Google's WMT'16 En-De data (Europarl v7 + CommonCrawl + News Commentary v11; newstest2010-2016):
# exactly as Google's wmt16_en_de.sh: tokenizer.perl -q (no -a, no normalization), clean-corpus-n 1 80,
# joint BPE (subword-nmt, 32k merges); Google's file names in WORK/google; binarized with a 32768-word joined dictionary.
#   scripts/prepare-wmt16-en-de.sh [--work work/wmt16_en_de] [--dest data-bin/wmt16_en_de_bpe32k]
#                                  [--mirror URL] [--google-archive wmt16_en_de.tar.gz] [--workers N] ...
# Re-run it after an interruption: finished stages are skipped, broken downloads fetched again.
# All options: scripts/prepare-wmt16-en-de.sh --help
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" -m b2t_tools.wmt.prepare "$@"
