#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, sized for one device call of at most 10 minutes
# (~30 s of set-up, step 1 at most PIPE_TIMEOUT_S = 150 s, step 2 TTA_S = 300 s, every step cut
# off by HARD_S = 570 s). It prints, for s and xxs,
# most valuable first (a device lease may end before the last step):
#
#   1. the input pipeline against the model (benchmarks/bench_pipeline.py, --recipe paper: the
#      full per-sample augmentation): bare step, augmentation alone on the device and in 8
#      loader workers, end-to-end `mmlit finetune --recipe paper` img/s with --loader device
#      and --loader workers (one round each, timed within the first epoch; eager: compiling each
#      run, ~80 s for s on the H200, does not fit the step), a host-sync check of the device path, and where a
#      bare step's time goes (torch.profiler: the device's busy share, top ops and kernels) with
#      SDPA's attention kernels timed at the preset's shapes (benchmarks/bench_attention.py);
#   2. time to accuracy: `mmlit finetune --preset s` on the 45,000 CIFAR-10 training JPEGs
#      (the last 500 per class held out), its epochs fitted so that the whole command (decode
#      and compile included) ends within TTA_S seconds; the held-out top-1 of its last epoch
#      (bench_tta.py fits the epochs with the allowance for compiling only when the run is long
#      enough for `mmlit finetune` to compile by default);
#   3. with the time left: CUDA graphs (--compile-mode reduce-overhead), a real 3-epoch
#      `mmlit finetune` run of s at step 1's batch, 512 (step 1 gives its eager rate to compare;
#      TORCH_LOGS=perf_hints says so if CUDA graphs were skipped).
#
#   pip install -e . && bash benchmarks/gpu.sh
#   bash benchmarks/gpu.sh --cpu-quick          # the same steps on a CPU with tiny budgets (a dry run)
#
# Environment (all optional):
#   LOG_DIR   where the log and JSON files go (default: $OUT, the device call's folder that comes
#             back, when set; else benchmarks/results)
#   DATA      CIFAR-10 JPEG ImageFolder (default /tmp/cifar10/train; when missing, unpacked from
#             cifar10-train-jpeg.tar.gz in .device-data/ (ignored by git: the device call carries
#             it), shared/data/, ../shared/data/ or /work/shared/data/)
#   PYTHON    interpreter with mmlit installed (default: python, else python3)
#   PRESETS   presets of step 1 (default s,xxs: s first, whose rate step 2 fits its epochs to)
#   TTA_S     wall-time budget of the time-to-accuracy command (default 300)
#   BUDGET_S  stop starting new steps after this many seconds (default 450)
#   STEP_TIMEOUT_S  kill a step that runs longer than this (default 420)
#   HARD_S    no step runs past this many seconds from the start (default 570 on a GPU, under the
#             device call's 600 s; 0 = no limit): a step gets at most what is left, and is skipped
#             when less than MIN_STEP_S (default 60) is left
#   PIPE_TIMEOUT_S  the same for step 1 (default 150 on a GPU: with ~30 s of set-up and step 2's
#             300 s the call stays within 8 minutes; what step 1 measured before it was killed is
#             in its JSON, which step 2 reads)
# A failing step is logged and the script goes on with the next; the exit status is the
# number of failed steps (a step skipped for the budget is not a failure, and says so).

set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu-quick" ]]; then MODE=cpu-quick; fi

PY=${PYTHON:-$(command -v python >/dev/null && echo python || echo python3)}
LOG_DIR=${LOG_DIR:-${OUT:-benchmarks/results}}
DATA=${DATA:-/tmp/cifar10/train}
PRESETS=${PRESETS:-s,xxs}
TTA_S=${TTA_S:-300}
BUDGET_S=${BUDGET_S:-450}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-420}
MIN_STEP_S=${MIN_STEP_S:-60}
if [[ $MODE == cpu-quick ]]; then
    DEVICE=cpu; PER_CLASS=30; HOLDOUT=10; TTA_S=${TTA_S_QUICK:-90}; BUDGET_S=0; FALLBACK_RATE=40; HARD_S=${HARD_S:-0}
    PIPE_TIMEOUT_S=${PIPE_TIMEOUT_S:-$STEP_TIMEOUT_S}
    PIPE_ARGS=(--steps 3 --warmup 1 --rounds 1 --batch 32 --workers 2 --profile 1)
else
    # FALLBACK_RATE: s's end-to-end img/s when step 1 left none (killed, failed): a guess, well
    # below the H200's eager bare step of docs/BENCHMARKS.md ("GPU: first measurements", 6,562
    # img/s at batch 512; end to end is at most that), for an H100 too: too low a guess costs
    # epochs, too high a one overruns step 2's budget.
    # PIPE_ARGS: 20 + 55 steps of 512 stay within the first epoch of 40,500 images (79 steps):
    # the first epoch's end (validation, the first figures) is not a training step's time.
    DEVICE=cuda; PER_CLASS=4500; HOLDOUT=500; FALLBACK_RATE=4000; HARD_S=${HARD_S:-570}
    PIPE_TIMEOUT_S=${PIPE_TIMEOUT_S:-150}
    PIPE_ARGS=(--steps 55 --warmup 20 --rounds 1 --batch 512 --workers 8 --sync-check --profile 10)
fi
STAMP=$(date +%Y%m%d-%H%M%S)
HOST=$(hostname 2>/dev/null || echo host)
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/$MODE-$HOST-$STAMP.log"
TMP=$(mktemp -d /tmp/mmlit-gpu-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
FAILED=0

run() {  # run a titled step, log it, keep going on failure; skip it once the budget is spent
    local title=$1; shift
    local limit=${LIMIT_S:-$STEP_TIMEOUT_S}
    echo
    echo "================ $title"
    if [[ $BUDGET_S -gt 0 && $SECONDS -ge $BUDGET_S ]]; then
        echo "skipped: ${SECONDS} s spent of the ${BUDGET_S} s budget"
        return 0
    fi
    if [[ $HARD_S -gt 0 ]]; then
        local left=$((HARD_S - SECONDS))
        if [[ $left -lt $MIN_STEP_S ]]; then
            echo "skipped: ${left} s left of the ${HARD_S} s limit (a step gets at least ${MIN_STEP_S} s)"
            return 0
        fi
        if [[ $left -lt $limit ]]; then limit=$left; fi
    fi
    echo "\$ $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "timed out after ${limit} s"; fi
    echo "---------------- rc=$rc, $((SECONDS - start)) s"
    if [[ $rc -ne 0 ]]; then FAILED=$((FAILED + 1)); fi
    return 0
}

ensure_data() {
    if [[ -d "$DATA" ]]; then return 0; fi
    local tarball
    for tarball in .device-data/cifar10-train-jpeg.tar.gz shared/data/cifar10-train-jpeg.tar.gz \
                   ../shared/data/cifar10-train-jpeg.tar.gz /work/shared/data/cifar10-train-jpeg.tar.gz \
                   data/cifar10-train-jpeg.tar.gz; do
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
          f"(epoch 1 includes compilation), train loss {row['train_loss']:.3f}, "
          f"val top-1 {row.get('val_top1', float('nan')):.2f}%")
EOF
}

main() {
    echo "mmlit benchmarks ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), host $HOST, log $LOG"
    run "environment" "$PY" -c "import sys, torch, torchvision, mmlit_cli; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); \
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); \
print('torchvision', torchvision.__version__, '| mmlit', mmlit_cli.__version__, mmlit_cli.__file__)"
    if command -v nvidia-smi >/dev/null; then run "nvidia-smi" nvidia-smi -L; fi
    if ! ensure_data; then echo "done: no data"; echo 1 > "$TMP/failed"; return; fi
    local folder
    folder=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; from pathlib import Path; \
print(common.holdout_folder(Path('$DATA'), $PER_CLASS, $HOLDOUT, Path('$TMP')))")
    echo "data: $folder (train/: the first $PER_CLASS images per class; val/: the last $HOLDOUT)"

    LIMIT_S=$PIPE_TIMEOUT_S run "pipeline: device-resident data and batched augmentation against loader workers (--recipe paper)" \
        "$PY" benchmarks/bench_pipeline.py --device "$DEVICE" --presets "$PRESETS" --dataset "$folder/train" \
        --recipe paper "${PIPE_ARGS[@]}" --json "$LOG_DIR/bench_pipeline-$HOST-$STAMP.json"
    run "time to accuracy: mmlit finetune --preset s, $PER_CLASS images/class, within ${TTA_S} s" \
        "$PY" benchmarks/bench_tta.py --data "$folder" --budget-s "$TTA_S" --device "$DEVICE" \
        --rates "$LOG_DIR/bench_pipeline-$HOST-$STAMP.json" --rate "$FALLBACK_RATE" --out "$TMP/tta" --json "$LOG_DIR/tta-$HOST-$STAMP.json"
    if [[ $MODE == gpu ]]; then
        TORCH_LOGS=perf_hints run "CUDA graphs: mmlit finetune -p s --compile-mode reduce-overhead, 3 epochs at 512" \
            "$PY" -m mmlit_cli finetune --preset s --dataset "$folder" --epochs 3 --compile-mode reduce-overhead \
            --batch-size 512 --device cuda --save-every 0 --out "$TMP/cg"
        show_metrics "$TMP/cg"
    fi
    echo
    echo "done: $FAILED failed step(s); log $LOG"
    echo "$FAILED" > "$TMP/failed"
}

main 2>&1 | tee "$LOG"
exit "$(cat "$TMP/failed" 2>/dev/null || echo 1)"
