#!/usr/bin/env bash
# One GPU session's whole job for the CIFAR-10 model, in ONE call of the device tool (which runs it
# over a copy of this working tree and brings back what is under $OUT, even when the call is cut
# off). Sized to the device's limits: 15 minutes of machine time in all, start-up included; one
# command of at most 600 s. The command plans for TOTAL seconds (default 540):
#
#   1. teacher: the CNN teacher (`vitdemo teacher`) alone on the GPU, on the 45,000 training images
#      (5,000 held out, split seed 0); beside it the tests that only a GPU runs
#   2. train: every variant side by side, one process each (one small ViT leaves an H200 mostly
#      idle), each with `--time-budget` up to the same deadline: its epochs chosen from its own pace
#      with the others running. Candidates to ship: main (the small-vit recipe, seed 0),
#      second-seed (seed 1) and distilled (main + the teacher's labels, weight 0.5). Ablations: the
#      main recipe with one ingredient left out, and crop-flip-only
#   3. pick: scripts/pick_run.py names the candidate to ship by its held-out accuracy alone (the
#      rule is written there, before any run), and writes the ablation table
#   4. speed: benchmarks/engine_speed.py on the GPU with the time left (the engine's step eager and
#      compiled against timm's; the whole loop)
#
# Nothing is lost on a time-out: every SHIP_EVERY seconds, and at the end, the candidates' latest
# checkpoints (trained weights and moving average, each written whole after every epoch) are copied
# into $OUT, and the logs, timeline, results and table are packed as $OUT/results.tar.gz; every copy
# is written beside and then renamed, so $OUT never holds half a file. The device returns 8 files of
# at most 16 MiB: 3 candidates x 2 weights (10.8 MB each for vit_cifar_9) + the archive = 7.
#
# Prepare here (nothing in .device is committed):
#   echo /.device/ >> .git/info/exclude; mkdir -p .device
#   cp ../shared/data/cifar10-train.tar.gz .device/
# then call the device tool with carry [".device"] and `bash scripts/device_train.sh`, timeout_s 600.
# Rehearse it here on the CPU with a tiny budget (the log is docs/device-rehearsal.log):
#   OUT=/tmp/device-out DEVICE=cpu LIMIT=10 BUDGET=60 TEACHER_EPOCHS=2 COMPILE= BENCH=0 bash scripts/device_train.sh
set -uo pipefail  # no -e: a failed phase or variant must not cost the others
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
TOTAL=${TOTAL:-540}  # seconds this command plans for (the device kills it at 600)
PRESET=${PRESET:-vit_cifar_9}
SET=${SET:-drop_path_rate=0.1}  # model hyper-parameters over the preset's
BATCH=${BATCH:-128}
EMA=${EMA:-0.9995}
COMPILE=${COMPILE---compile reduce-overhead}  # COMPILE= (empty) for eager
TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}
TEACHER_LIMIT=${TEACHER_LIMIT:-120}  # seconds; a teacher not done by then is dropped, with the distilled run
LIMIT=${LIMIT:-}  # images per class, for a rehearsal
BUDGET=${BUDGET:-}  # each variant's --time-budget; by default what is left until the deadline
BENCH=${BENCH:-1}
BENCH_SECONDS=${BENCH_SECONDS:-75}  # kept at the end for the speed figures
SHIP_EVERY=${SHIP_EVERY:-20}
LOAD_SECONDS=${LOAD_SECONDS:-25}  # a run's data loading and out-of-distribution fit, outside its budget
CANDIDATES="main second-seed distilled"
RESULTS=/tmp/device-results RUNS=/tmp/device-runs DATA=/tmp/vitdemo-data
export PYTHONUNBUFFERED=1
START=$SECONDS

rm -rf "$RESULTS" "$RUNS"
mkdir -p "$OUT" "$DATA" "$RESULTS" "$RUNS"
log() { echo "[$(( SECONDS - START )) s] $*" | tee -a "$RESULTS/timeline.txt"; }

# Write $2 as $OUT/$1 whole: beside it first (three folders down, which the device does not return).
publish() {
    local partial="$OUT/partial/of/copies"
    mkdir -p "$partial" && cp "$2" "$partial/$1" && mv -f "$partial/$1" "$OUT/$1"
}
ship() {  # the candidates' latest weights and every log, into $OUT
    local name
    for name in $CANDIDATES; do
        [ -f "$RUNS/$name/model.safetensors" ] && publish "$name.model.safetensors" "$RUNS/$name/model.safetensors"
        [ -f "$RUNS/$name/ema/model.safetensors" ] && publish "$name.ema.safetensors" "$RUNS/$name/ema/model.safetensors"
    done
    for run in "$RUNS"/*/; do
        name=$(basename "$run")
        cp "$run/results.json" "$RESULTS/$name.results.json" 2>/dev/null
        [ -f "$run/curves.png" ] && cp "$run/curves.png" "$RESULTS/$name.curves.png"
    done
    tar -czf /tmp/device-results.tar.gz -C "$RESULTS" . && publish results.tar.gz /tmp/device-results.tar.gz
}
shipping() { while sleep "$SHIP_EVERY"; do ship; done; }

log "start: DEVICE=$DEVICE TOTAL=$TOTAL LIMIT=${LIMIT:-all} BUDGET=${BUDGET:-to the deadline} COMPILE=$COMPILE"
tar -xzf .device/cifar10-train.tar.gz -C "$DATA"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    | tee "$RESULTS/versions.txt"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
shipping & shipper=$!
log "data unpacked"

limit=() val_size=5000
if [ -n "$LIMIT" ]; then limit=(--max-images-per-class "$LIMIT"); val_size=0.1; fi
data=(--data "$DATA/cifar10/train" --val-size "$val_size" --split-seed 0 --device "$DEVICE" "${limit[@]}")

# 1. The teacher, alone on the GPU; beside it the GPU-only tests (a broken GPU path shows here).
if [ "$DEVICE" = cuda ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_recipe.py -k "gpu or cuda" \
        > "$RESULTS/gpu_tests.txt" 2>&1 &
fi
log "teacher: $TEACHER_EPOCHS epochs, at most $TEACHER_LIMIT s"
OMP_NUM_THREADS=4 timeout "$TEACHER_LIMIT" python3 -m vitdemo teacher "${data[@]}" --epochs "$TEACHER_EPOCHS" --seed 0 \
    --out "$RUNS/teacher" --force > "$RESULTS/teacher.log" 2>&1 || echo "FAILED or cut off" >> "$RESULTS/teacher.log"
log "teacher done: $(tail -1 "$RESULTS/teacher.log")"

# 2. Every variant at once, each with a budget up to the same deadline.
kept=15  # to pick and pack
if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ]; then kept=$(( kept + BENCH_SECONDS )); fi
deadline=$(( TOTAL - kept ))
budget=${BUDGET:-$(( deadline - (SECONDS - START) - LOAD_SECONDS ))}
train() {  # NAME [more train options]
    local name=$1; shift
    local cmd=(python3 -m vitdemo train "${data[@]}" --preset "$PRESET" --set $SET --recipe small-vit
               --batch-size "$BATCH" --ema "$EMA" --time-budget "$budget" --seed 0 --out "$RUNS/$name" --force
               --log-every 1000 $COMPILE "$@")
    echo "$name: ${cmd[*]}" >> "$RESULTS/commands.txt"
    local begin=$SECONDS
    OMP_NUM_THREADS=2 "${cmd[@]}" > "$RESULTS/$name.log" 2>&1 || echo "FAILED" >> "$RESULTS/$name.log"
    echo "$name: $(( SECONDS - begin )) s" >> "$RESULTS/$name.log"
}
log "variants: a budget of $budget s each"
pids=()
train main & pids+=($!)
train second-seed --seed 1 & pids+=($!)
if [ -f "$RUNS/teacher/teacher.safetensors" ]; then
    train distilled --teacher "$RUNS/teacher" & pids+=($!)
fi
train without-autoaugment --policy none & pids+=($!)
train without-mixing --mixup 0 --cutmix 0 & pids+=($!)
train without-erasing --erasing 0 & pids+=($!)
train crop-flip-only --policy none --mixup 0 --cutmix 0 --erasing 0 & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
log "variants done"

# 3. The pick, by the held-out split alone, and the ablation table.
kill "$shipper" 2>/dev/null
python3 scripts/pick_run.py "$RUNS" --candidates $CANDIDATES --teacher "$RUNS/teacher" \
    --out "$RESULTS/chosen.json" --table "$RESULTS/ablation.md" 2>&1 | tee "$RESULTS/pick.txt"
ship
log "picked and shipped"

# 4. Speed, with the time left.
left=$(( TOTAL - (SECONDS - START) - 5 ))
if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ] && [ "$left" -gt 20 ]; then
    log "speed: $left s"
    timeout "$left" bash -c 'python3 benchmarks/engine_speed.py step --device cuda --preset vit_cifar_9 --batch 128 \
        --compile default reduce-overhead; python3 benchmarks/engine_speed.py run --device cuda --preset vit_cifar_9 \
        --batch 128 --compile reduce-overhead' > "$RESULTS/speed.txt" 2>&1
fi
log "end"
ship
ls -la "$OUT"
cat "$RESULTS/pick.txt" "$RESULTS/timeline.txt"
rm -rf "$OUT/partial"
