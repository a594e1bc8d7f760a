#!/usr/bin/env bash
# Rebuild Google's WMT'16 En-De data (Europarl v7 + CommonCrawl + News Commentary v11; newstest2010-2016):
# download + verify, Moses tokenization (-a), cleaning, joint BPE (subword-nmt, 32k merges), binarization.
#   scripts/prepare-wmt16-en-de.sh [--work work/wmt16_en_de] [--dest data-bin/wmt16_en_de_bpe32k]
#                                  [--mirror URL] [--google-archive wmt16_en_de.tar.gz] [--workers N] ...
# Re-run it after an interruption: finished stages are skipped, broken downloads fetched again.
# All options: scripts/prepare-wmt16-en-de.sh --help
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${B2T_PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" -m b2t_fairseq.wmt.prepare "$@"
