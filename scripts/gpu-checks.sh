#!/usr/bin/env bash
# Every GPU check of b2t-fairseq in one short run (not yet run on a GPU; each step has a timeout and keeps partial results):
#   1. fp16 training smoke of each named architecture through b2t-train on a toy corpus
#   2. b2t-bench at the paper's sizes (transformer_wmt_en_de, 32k vocabulary), max-tokens
#      3584 / 8192 / 32768, 6 and 18 layers, stock Post-LN and Pre-LN and every layer type of the
#      plugin (layer_types.LAYER_TYPES) interleaved, --fp16
#   3. a profile of one stock fairseq Post-LN update (6 layers, max-tokens 8192): kernel time
#      against gaps, the largest kernels, achieved fraction of the measured fp16 matmul peak
# Results go to $OUT if set (the device tool), else results/gpu/: env.txt, train-smoke.tsv,
# train-smoke.log, bench-gpu.json, bench-gpu.txt, profile-gpu.json (six files).
#
# With --fast-path it runs instead only the fast-path checks (estimated 5-6 minutes on
# one H200, never more than 8: timeouts of 140 + 140 + 180 s, partial results are kept):
#   4. b2t-bench, paper sizes, 6 and 18 layers, max-tokens 3584 and 28672 (the recipe's two
#      batch layouts): stock fairseq against --b2t-fast in fp16 (fairseq --fp16), and the
#      fairseq path against --b2t-fast in bf16 (--b2t-bf16; stock fairseq has no GPU bf16)
#   5. 200 updates of the 18-layer B2T model, fp16, plain and --b2t-fast, same seed and
#      batches: the two loss curves must agree (20-update means within 2%)
#   files: env.txt, fast-fp16.json/.txt, fast-bf16.json/.txt, fast-curve-18l-b2t.json/.txt
#
# Usage
#   here (pip reaches PyPI):  scripts/gpu-checks.sh --fetch-wheels [DIR]   # default DIR: .whl
#   on the GPU machine:       scripts/gpu-checks.sh [--fast-path]
# A GPU machine without fairseq installs it from the wheels in $B2T_WHEELS (default .whl, built
# for CPython 3.12 by --fetch-wheels) into a scratch folder; nothing else is installed.
# Environment: PYTHON (default python3), B2T_WHEELS, B2T_BENCH_ARGS (extra b2t-bench flags),
# B2T_SKIP_SMOKE=1 / B2T_SKIP_BENCH=1 to run only part.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${B2T_WHEELS:-.whl}

die() { echo "gpu-checks: error: $*" >&2; exit 2; }

fetch_wheels() {  # run where pip reaches PyPI; the GPU machine reaches none
    local dir=${1:-.whl} plat=()
    for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        plat+=(--platform "$p")
    done
    mkdir -p "$dir"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d "$dir" fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3
    "$PY" -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3  # source only on PyPI
    ls -1 "$dir"
    echo "gpu-checks: wheels in $dir; for the device tool, keep that folder inside the checkout, out of git" \
         "(echo /.whl/ >> .git/info/exclude), and name it in carry"
}

if [[ ${1:-} == --fetch-wheels ]]; then
    [[ -n ${PYTHON:-} || ! -x .venv/bin/python ]] || PY=.venv/bin/python  # any python with pip will do
    fetch_wheels "${2:-.whl}"
    exit 0
fi
FAST_PATH=0
if [[ ${1:-} == --fast-path ]]; then
    FAST_PATH=1
    shift
fi
[[ $# -eq 0 ]] || die "unknown argument '$1'; run without arguments (or with --fast-path) on the GPU machine, or --fetch-wheels [DIR] here"

RES=${OUT:-$REPO/results/gpu}
mkdir -p "$RES"
WORK=$(mktemp -d /tmp/b2t-gpu-checks.XXXXXX)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

# --- environment ---------------------------------------------------------------------------
if ! "$PY" -c 'import fairseq' 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null || die "fairseq is not installed and there are no wheels in $WHEELS; run 'scripts/gpu-checks.sh --fetch-wheels' where pip works, then carry that folder"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # the plugin from this checkout
"$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || die "no CUDA device visible to $PY; run this on the GPU machine"
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import sys, torch, fairseq; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "fairseq", fairseq.__version__)'
    git -C "$REPO" log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$RES/env.txt"

status=0

# --- 4 and 5. the fast path (--fast-path) -------------------------------------------------------
if [[ $FAST_PATH == 1 ]]; then
    FAST_BENCH=(--arch-size paper --layers 6 18 --max-tokens 3584 28672 --rounds 3 --warmup 1 --batches 3)
    echo "== 4a. b2t-bench fp16: stock fairseq vs --b2t-fast"
    # shellcheck disable=SC2086
    timeout 140 "$PY" -m b2t_tools.analysis.bench "${FAST_BENCH[@]}" --dtype fp16 \
        --variants stock_post_ln plugin_b2t fast_post_ln fast_b2t --json "$RES/fast-fp16.json" ${B2T_BENCH_ARGS:-} \
        2>"$WORK/fast-fp16.err" | tee "$RES/fast-fp16.txt" || { status=1; tail -n 40 "$WORK/fast-fp16.err"; }
    echo "== 4b. b2t-bench bf16 (--b2t-bf16): the fairseq path vs --b2t-fast"
    # shellcheck disable=SC2086
    timeout 140 "$PY" -m b2t_tools.analysis.bench "${FAST_BENCH[@]}" --dtype bf16 \
        --variants plugin_post_ln plugin_b2t fast_post_ln fast_b2t --json "$RES/fast-bf16.json" ${B2T_BENCH_ARGS:-} \
        2>"$WORK/fast-bf16.err" | tee "$RES/fast-bf16.txt" || { status=1; tail -n 40 "$WORK/fast-bf16.err"; }
    echo "== 5. loss curves, 18-layer B2T, 200 updates, fp16: plain vs --b2t-fast"
    timeout 180 "$PY" -m b2t_tools.analysis.fast_curve --size paper --layers 18 --ln-position b2t --max-tokens 3584 \
        --updates 200 --device cuda --dtype fp16 --json "$RES/fast-curve-18l-b2t.json" \
        2>"$WORK/fast-curve.err" | tee "$RES/fast-curve-18l-b2t.txt" || { status=1; tail -n 40 "$WORK/fast-curve.err"; }
    echo "gpu-checks: fast-path results in $RES (status $status)"
    exit $status
fi

# --- 1. fp16 training smoke of each architecture ------------------------------------------------
smoke() {
    "$PY" - "$WORK/raw" <<'EOF'
import random, sys, pathlib
en = "the a cat dog house tree red blue big small runs sees eats".split()
de = dict(zip(en, "der ein katze hund haus baum rot blau gross klein rennt sieht isst".split()))
rng, out = random.Random(0), pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for split, n in (("train", 2000), ("valid", 100)):
    with open(out / f"{split}.en", "w") as fe, open(out / f"{split}.de", "w") as fd:
        for _ in range(n):
            s = [rng.choice(en) for _ in range(rng.randint(3, 12))]
            fe.write(" ".join(s) + "\n"); fd.write(" ".join(de[w] for w in s) + "\n")
EOF
    "$PY" -m fairseq_cli.preprocess --source-lang en --target-lang de --trainpref "$WORK/raw/train" \
        --validpref "$WORK/raw/valid" --destdir "$WORK/bin" --joined-dictionary --workers 4 >"$WORK/prep.log" 2>&1 \
        || { cat "$WORK/prep.log"; return 1; }
    local pids=() archs=() recipe=() families=()
    # the paper's optimizer (b2t_fairseq/recipe.py) with a short warmup
    mapfile -t recipe < <("$PY" -c 'import sys; from b2t_fairseq import recipe; print("\n".join(recipe.optimizer_argv(*sys.argv[1:])))' 0.0005 20)
    mapfile -t families < <("$PY" -c 'from b2t_fairseq import layer_types; print("\n".join(layer_types.SHORTS))')
    for ln in "${families[@]}"; do
        for suffix in "" _18l _tiny; do
            arch=transformer_${ln}${suffix}
            archs+=("$arch")
            timeout 300 "$PY" -m b2t_tools.commands.cli train "$WORK/bin" \
                --arch "$arch" --fp16 "${recipe[@]}" --max-tokens 1024 \
                --max-update 60 --log-format simple --log-interval 10 --no-save --disable-validation \
                --seed 1 --num-workers 0 >"$WORK/train-$arch.log" 2>&1 &
            pids+=($!)
        done
    done
    local rc ok=0
    printf 'arch\texit\tfirst_loss\tlast_loss\tupdates\tfp16_loss_scale\n' >"$RES/train-smoke.tsv"
    for i in "${!pids[@]}"; do
        rc=0; wait "${pids[$i]}" || rc=$?
        arch=${archs[$i]}
        "$PY" - "$WORK/train-$arch.log" "$arch" "$rc" >>"$RES/train-smoke.tsv" <<'EOF'
import math, re, sys
log, arch, rc = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
losses = [float(x) for x in re.findall(r"(?<![a-z_])loss[ =]([0-9.]+|nan|inf)", log)]
ups = re.findall(r"num_updates[ =](\d+)", log)
scale = re.findall(r"(?<![a-z_])loss_scale[ =]([0-9.]+)", log)
print("\t".join([arch, rc, f"{losses[0]:.3f}" if losses else "-", f"{losses[-1]:.3f}" if losses else "-",
                 ups[-1] if ups else "-", scale[-1] if scale else "-"]))
EOF
        { echo "===== $arch (exit $rc)"; tail -n 25 "$WORK/train-$arch.log"; } >>"$RES/train-smoke.log"
        [[ $rc -eq 0 ]] || ok=1
    done
    column -t "$RES/train-smoke.tsv" || cat "$RES/train-smoke.tsv"
    # every run must finish its 60 updates with a finite loss, and all but the 18-layer ones
    # (dropout 0.5, deep) with a lower loss than at update 10
    "$PY" - "$RES/train-smoke.tsv" <<'EOF' || ok=1
import math, sys
bad = []
for row in list(open(sys.argv[1]))[1:]:
    arch, rc, first, last, ups, scale = row.rstrip("\n").split("\t")
    finite = last != "-" and math.isfinite(float(last))
    learned = finite and (arch.endswith("_18l") or float(last) < float(first))
    if rc != "0" or ups != "60" or not learned:
        bad.append(arch)
if bad:
    sys.exit("gpu-checks: training smoke failed for " + ", ".join(bad))
EOF
    return $ok
}

if [[ ${B2T_SKIP_SMOKE:-0} != 1 ]]; then
    echo "== 1. fp16 training smoke (every layer type's named architectures, in parallel)"
    smoke || status=1
fi

# --- 2 and 3. benchmark at the paper's sizes, and the profile ---------------------------------
if [[ ${B2T_SKIP_BENCH:-0} != 1 ]]; then
    echo "== 2. b2t-bench, paper sizes, fp16; 3. profile of one stock Post-LN update"
    # every layer type's record, beside stock fairseq's two
    mapfile -t plugin_variants < <("$PY" -c 'from b2t_fairseq import layer_types; print("\n".join("plugin_" + s for s in layer_types.SHORTS))')
    # shellcheck disable=SC2086
    timeout 420 "$PY" -m b2t_tools.analysis.bench --arch-size paper --layers 6 18 --max-tokens 3584 8192 32768 \
        --variants stock_post_ln stock_pre_ln "${plugin_variants[@]}" \
        --json "$RES/bench-gpu.json" --profile "$RES/profile-gpu.json" --profile-layers 6 --profile-max-tokens 8192 \
        ${B2T_BENCH_ARGS:-} 2>"$WORK/bench.err" | tee "$RES/bench-gpu.txt" || { status=1; tail -n 40 "$WORK/bench.err"; }
    grep -v USDT "$WORK/bench.err" | tail -n 5 >>"$RES/bench-gpu.txt" || true
fi

echo "gpu-checks: results in $RES (status $status)"
exit $status
