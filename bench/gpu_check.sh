#!/usr/bin/env bash
# Issue 16's device check: one run on a CUDA machine (an H200 or H100), about 8 minutes with the
# install of the carried wheels. Run from the repository root with `.whl` carried:
#
#     bash bench/gpu_check.sh
#
# Everything goes to $OUT (at most 8 files): gpu_check.log (all output), 1b.json, profile_1b.txt,
# profile_1b.json, 270m.json, 16k.json, variants.json. Stages run in order of importance; none
# starts after GPU_CHECK_BUDGET_S seconds (default 400) and each is cut at GPU_CHECK_LIMIT_S
# (default 480) from the start, so the script ends inside a 540-second call with what it has.
# GPU_CHECK_DRY=1 runs the same logic on the CPU with a tiny model and few samples (no wheels).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-400}
LIMIT=${GPU_CHECK_LIMIT_S:-480}
PY=${PYTHON:-python3}

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    DEVICE=cpu BIG=tiny SMALL=tiny N4K=128 N16K=256 CORPUS=420 HELD=24 REPEAT=2 WARMUP=2 T4K=512 T16K=1024
else
    DEVICE=cuda BIG=1b SMALL=270m REPEAT=2 WARMUP=3 HELD=64 T4K=4096 T16K=16384
    # ~156 tokens per sample: 896 samples keep full 4,096-token packs (an epoch keeps >= 32 steps,
    # packing.MIN_STEPS_PER_EPOCH) and give ~34 steps; 3,400 do the same for 16,384-token packs
    N4K=896 N16K=3400 CORPUS=3500
    if [ -d .whl ]; then
        echo "== installing $(ls .whl | wc -l) wheels"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
fi
echo "== $(date -u +%FT%TZ) device=$DEVICE shapes=$BIG/$SMALL; after install: $((SECONDS - start)) s"
$PY - <<'EOF' || { echo "imports failed"; exit 1; }
import importlib, sys
for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pydantic",
             "pydantic_settings", "pyarrow", "triton"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {getattr(m, '__file__', '')}")
    except Exception as exc:  # report all, then fail below on the ones the bench needs
        print(f"{name} MISSING: {exc!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import trl, datasets, peft, bitsandbytes, pydantic_settings  # noqa: F401,E401  (fail fast)
sys.path.insert(0, ".")
import train, packing  # noqa: F401,E401
EOF

BENCH=("$PY" bench/train_throughput.py --device "$DEVICE" --random-weights --model-dir /tmp/bench-models
       --corpus-samples "$CORPUS" --heldout "$HELD" --warmup "$WARMUP")

stage() {  # stage NAME ARGS...: one bench run, its JSON as $OUT/NAME.json
    local name=$1; shift
    local used=$((SECONDS - start))
    if (( used > BUDGET )); then echo "== SKIP $name (${used} s used)"; return; fi
    echo "== $name (at ${used} s): $*"
    timeout --kill-after=10 $((LIMIT - used)) "${BENCH[@]}" "$@" --json "$OUT/$name.json" \
        || echo "== $name FAILED or cut (status $?)"
}

# 1. the issue's comparison: 1b shape, bf16 and 8-bit, project vs TRL, two runs each
stage 1b --shape "$BIG" --quant none,8bit --methods trl,project --repeat "$REPEAT" \
    --train-samples "$N4K" --batch-tokens "$T4K"
# 2. where the project's time goes (1b, bf16): profiler table of 4 steps after the warm-up
stage profile_1b --shape "$BIG" --quant none --methods project --repeat 1 \
    --train-samples "$N4K" --batch-tokens "$T4K" --profile "$OUT/profile_1b.txt"
# 3. 270m (the default model's shape), bf16 and 8-bit: TRL, the project, and the project as it was
#    (project-plain). Same training and held-out samples for all: the held-out losses compare them.
stage 270m --shape "$SMALL" --quant none,8bit --methods trl,project,project-plain --repeat "$REPEAT" \
    --train-samples "$N4K" --batch-tokens "$T4K"
# 4. bigger steps for MFU: 16,384 tokens per step, 1b bf16
stage 16k --shape "$BIG" --quant none --methods project --repeat 1 --train-samples "$N16K" --batch-tokens "$T16K"
# 5. what to choose next: one row per pack (sdpa), flex attention, and 4-bit
stage variants_rows --shape "$BIG" --quant none --methods project --repeat 1 \
    --train-samples "$N4K" --batch-tokens "$T4K" --row-tokens "$T4K"
stage variants_flex --shape "$BIG" --quant none --methods project --repeat 1 \
    --train-samples "$N4K" --batch-tokens "$T4K" --attn flex_attention

echo "== done in $((SECONDS - start)) s"
ls -la "$OUT"
