#!/usr/bin/env bash
# fairseq's own tests, run without and with the plugin imported: importing b2t_fairseq may repair
# fairseq but must not change what fairseq's tests expect (b2t_fairseq/patches/__init__.py).
#
#   scripts/fairseq-own-tests.sh FAIRSEQ [PYTEST_ARGS...]
#
# FAIRSEQ: a clone of github.com/facebookresearch/fairseq (a work tree or a bare git directory);
# its tests/ are exported into a temporary folder (nothing in FAIRSEQ or here is changed) and run
# against the installed fairseq with this repository's venv (PYTHON=... to choose another python).
# Runs tests/test_checkpoint_utils.py, test_sequence_generator.py, test_iterators.py, test_train.py
# and test_binaries.py -k translation (BINARIES_K=... to choose another subset; BINARIES_K= none).
# Not run by CI or `make test`: it needs that clone and takes minutes (test_binaries trains models).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:?usage: $0 FAIRSEQ_CHECKOUT [PYTEST_ARGS...]}"
shift
python="${PYTHON:-$here/.venv/bin/python}"
binaries_k="${BINARIES_K-translation}"
if [ -d "$src/.git" ]; then gitdir="$src/.git"; else gitdir="$src"; fi
git --git-dir "$gitdir" rev-parse --verify -q HEAD >/dev/null || { echo "$0: error: $src is not a git clone of fairseq; clone github.com/facebookresearch/fairseq" >&2; exit 2; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/fairseq-own-tests.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
git --git-dir "$gitdir" archive HEAD tests | tar -x -C "$tmp"
cat > "$tmp/conftest.py" <<'PY'
import os

if os.environ.get("WITH_B2T_PLUGIN") == "1":
    import b2t_fairseq  # noqa: F401  (what --user-dir b2t_fairseq does)
PY

run() {  # run LABEL 0|1 [PYTEST_ARGS...]: without/with the plugin; prints the failures and the counts
    local label="$1" plugin="$2" rc=0
    shift 2
    ( cd "$tmp" && WITH_B2T_PLUGIN="$plugin" "$python" -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_checkpoint_utils.py tests/test_sequence_generator.py tests/test_iterators.py tests/test_train.py \
        "$@" ) > "$tmp/$label.log" 2>&1 || rc=$?
    if [ -n "$binaries_k" ]; then
        ( cd "$tmp" && WITH_B2T_PLUGIN="$plugin" "$python" -m pytest -q -p no:cacheprovider -o addopts= \
            tests/test_binaries.py -k "$binaries_k" "$@" ) >> "$tmp/$label.log" 2>&1 || rc=$?
    fi
    grep -E "^(FAILED|ERROR) |^[0-9]+ (passed|failed|skipped|deselected|error)|^=+ .*[0-9]+ (passed|failed|error)" "$tmp/$label.log" | sed "s/^/[$label] /"
    return $rc
}

echo "fairseq tests from $(git --git-dir "$gitdir" rev-parse --short HEAD), installed fairseq: $("$python" -c 'import fairseq; print(fairseq.__version__)')"
rc=0
run without 0 "$@" || rc=$?
run with-plugin 1 "$@" || rc=$?
exit $rc
