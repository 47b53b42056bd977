#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the model benchmark (bf16 autocast +
# torch.compile, batch 512), the training-pipeline benchmark, and real `mmlit finetune`
# throughput runs (preset s, CIFAR-10 JPEG folder, --compile). Everything goes to one log.
#
#   pip install -e . && bash benchmarks/gpu.sh
#   bash benchmarks/gpu.sh --cpu-quick          # smoke test of the same steps on a CPU
#
# Environment (all optional):
#   LOG_DIR   where the log and JSON files go (default benchmarks/results)
#   DATA      CIFAR-10 JPEG ImageFolder (default /tmp/cifar10/train; unpacked from
#             shared/data/cifar10-train-jpeg.tar.gz or /work/shared/data/... when missing)
#   PYTHON    interpreter with mmlit installed (default: python)
#   PRESETS   presets for the benchmarks (default xxs,xs,s)
#   FT_EPOCHS epochs of each finetune throughput run (default 2: 2 x 351 steps at batch 128)
#   BUDGET_S  stop starting new steps after this many seconds (default: no limit); a device
#             lease is short, so the steps run most valuable first: real `mmlit finetune`
#             (bf16, fused AdamW, compile), the model benchmark, the pipeline benchmark, then
#             CUDA graphs (max-autotune) and the fp32 reference
#   STEP_TIMEOUT_S  kill a step that runs longer than this (default 600)
# A failing step is logged and the script goes on with the next; the exit status is the
# number of failed steps (a step skipped for the budget is not a failure, and says so).

set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu-quick" ]]; then MODE=cpu-quick; fi

PY=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-benchmarks/results}
DATA=${DATA:-/tmp/cifar10/train}
PRESETS=${PRESETS:-xxs,xs,s}
FT_EPOCHS=${FT_EPOCHS:-2}
BUDGET_S=${BUDGET_S:-0}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-600}
STAMP=$(date +%Y%m%d-%H%M%S)
HOST=$(hostname 2>/dev/null || echo host)
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/$MODE-$HOST-$STAMP.log"
TMP=$(mktemp -d /tmp/mmlit-gpu-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
FAILED=0

run() {  # run a titled step, log it, keep going on failure; skip it once the budget is spent
    local title=$1; shift
    echo
    echo "================ $title"
    if [[ $BUDGET_S -gt 0 && $SECONDS -ge $BUDGET_S ]]; then
        echo "skipped: ${SECONDS} s spent of the ${BUDGET_S} s budget"
        return 0
    fi
    echo "\$ $*"
    local start=$SECONDS
    timeout --kill-after=10 "$STEP_TIMEOUT_S" "$@"
    local rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "timed out after ${STEP_TIMEOUT_S} s"; fi
    echo "---------------- rc=$rc, $((SECONDS - start)) s"
    if [[ $rc -ne 0 ]]; then FAILED=$((FAILED + 1)); fi
    return 0
}

ensure_data() {
    if [[ -d "$DATA" ]]; then return 0; fi
    local tarball
    for tarball in shared/data/cifar10-train-jpeg.tar.gz ../shared/data/cifar10-train-jpeg.tar.gz \
                   /work/shared/data/cifar10-train-jpeg.tar.gz; do
        if [[ -f "$tarball" && "$DATA" == */train ]]; then
            echo "unpacking $tarball -> $(dirname "$DATA")"
            mkdir -p "$(dirname "$DATA")" && tar xzf "$tarball" -C "$(dirname "$DATA")"
            [[ -d "$DATA" ]] && return 0
        fi
    done
    echo "no dataset at $DATA (set DATA=...): skipping the data-dependent steps"
    return 1
}

show_metrics() {  # the per-epoch throughput the engine recorded
    "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "metrics.jsonl"
if not path.is_file():
    sys.exit(f"no {path}")
for line in path.read_text().splitlines():
    row = json.loads(line)
    print(f"epoch {row['epoch']}: {row['train_img_per_s']:,.0f} img/s over {row['epoch_time_s']:.1f} s "
          f"(epoch 1 includes compilation and worker start-up), train loss {row['train_loss']:.3f}, "
          f"val top-1 {row.get('val_top1', float('nan')):.2f}%")
EOF
}

gpu_steps() {  # most valuable first: the lease may end before the last step
    local have_data=0
    if ensure_data; then have_data=1; fi
    if [[ $have_data -eq 1 ]]; then
        run "mmlit finetune -p s --compile ($FT_EPOCHS epochs, batch 512, 8 workers)" \
            "$PY" -m mmlit_cli finetune --preset s --dataset "$DATA" --compile --epochs "$FT_EPOCHS" \
            --batch-size 512 --workers 8 --device cuda --save-every 0 --out "$TMP/ft-s-512"
        show_metrics "$TMP/ft-s-512"
    fi
    run "bench_models: bf16 + compile, batch 512" \
        "$PY" benchmarks/bench_models.py --device cuda --presets "$PRESETS" --bf16 --compile --batch 512 \
        --json "$LOG_DIR/bench_models-$HOST-$STAMP.json"
    if [[ $have_data -eq 1 ]]; then
        run "bench_train: batch 512, 8 workers, compiled" \
            "$PY" benchmarks/bench_train.py --device cuda --presets "$PRESETS" --dataset "$DATA" --compile \
            --batch 512 --workers 8 --json "$LOG_DIR/bench_train-b512-$HOST-$STAMP.json"
        run "mmlit finetune -p s --compile ($FT_EPOCHS epochs, batch 128)" \
            "$PY" -m mmlit_cli finetune --preset s --dataset "$DATA" --compile --epochs "$FT_EPOCHS" \
            --device cuda --save-every 0 --out "$TMP/ft-s-128"
        show_metrics "$TMP/ft-s-128"
        run "mmlit finetune -p s --compile-mode max-autotune ($FT_EPOCHS epochs, batch 512, 8 workers)" \
            "$PY" -m mmlit_cli finetune --preset s --dataset "$DATA" --compile-mode max-autotune \
            --epochs "$FT_EPOCHS" --batch-size 512 --workers 8 --device cuda --save-every 0 --out "$TMP/ft-s-512-ma"
        show_metrics "$TMP/ft-s-512-ma"
        run "bench_train: preset batch size and workers, compiled" \
            "$PY" benchmarks/bench_train.py --device cuda --presets "$PRESETS" --dataset "$DATA" --compile \
            --json "$LOG_DIR/bench_train-$HOST-$STAMP.json"
    fi
    run "bench_models: fp32 eager, batch 512 (no autocast, for reference)" \
        "$PY" benchmarks/bench_models.py --device cuda --presets "$PRESETS" --batch 512 --rounds 3 --quiet \
        --json "$LOG_DIR/bench_models-fp32-$HOST-$STAMP.json"
}

main() {
    echo "mmlit benchmarks ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), host $HOST, log $LOG"
    run "environment" "$PY" -c "import sys, torch, torchvision, mmlit_cli; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); \
print('torchvision', torchvision.__version__, '| mmlit', mmlit_cli.__version__, mmlit_cli.__file__)"
    if command -v nvidia-smi >/dev/null; then run "nvidia-smi" nvidia-smi; fi

    if [[ $MODE == gpu ]]; then
        gpu_steps
    else
        run "bench_models (CPU quick)" "$PY" benchmarks/bench_models.py --device cpu --quick \
            --json "$LOG_DIR/bench_models-$HOST-$STAMP.json"
    fi

    if [[ $MODE == cpu-quick ]] && ensure_data; then
        run "bench_train (CPU quick)" "$PY" benchmarks/bench_train.py --device cpu --quick --dataset "$DATA" \
            --json "$LOG_DIR/bench_train-$HOST-$STAMP.json"
        "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; from pathlib import Path; \
common.subset_folder(Path('$DATA'), 20, Path('$TMP'))"
        run "mmlit finetune -p xxs (CPU quick: 20 images/class, 1 epoch, batch 32)" \
            "$PY" -m mmlit_cli finetune --preset xxs --dataset "$TMP/$(basename "$DATA")-20" --epochs 1 \
            --batch-size 32 --device cpu --save-every 0 --out "$TMP/ft-xxs"
        show_metrics "$TMP/ft-xxs"
    fi
    echo
    echo "done: $FAILED failed step(s); log $LOG"
    echo "$FAILED" > "$TMP/failed"
}

main 2>&1 | tee "$LOG"
exit "$(cat "$TMP/failed" 2>/dev/null || echo 1)"
