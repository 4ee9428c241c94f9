#!/usr/bin/env bash
# One GPU session's whole job for the CIFAR-10 model, in one call of the device tool (which runs
# it over a copy of this working tree and brings back what is written under $OUT):
#
#   1. speed: benchmarks/engine_speed.py on the GPU (this engine's step eager and compiled against
#      timm's same step; the whole loop with and without the fast path) and, when .device/old
#      holds an earlier vitdemo package, that engine's loop on the same recipe: before/after
#   2. train: the small-vit recipe from scratch on the 45,000 training images (5,000 held out,
#      split seed 0); with ABLATE=1, beside it and on the same GPU (a small ViT's step leaves it
#      mostly idle), one shorter run per ingredient left out, for the ablation
#   3. evaluate the trained and the moving-average weights on the held-out images; return the logs
#      and figures as $OUT/results.tar.gz and the main run's weights in parts of at most 15 MB (the
#      device tool returns 8 files of at most 16 MB): `cat model.safetensors.part.* > model.safetensors`
#
# Prepare here (nothing in .device is committed):
#   echo /.device/ >> .git/info/exclude; mkdir -p .device
#   cp ../shared/data/cifar10-train.tar.gz .device/
#   git worktree add /tmp/old 522957b && cp -r /tmp/old/vitdemo .device/old/   # optional baseline
# then call the device tool with carry [".device"] and `bash scripts/device_train.sh` (variables
# before it). Try it here first on the CPU with a tiny budget:
#   OUT=/tmp/device-out EPOCHS=1 LIMIT=100 DEVICE=cpu COMPILE= ABLATE=1 bash scripts/device_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder for the results}
RESULTS=/tmp/device-results  # gathered here, returned as one archive
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-300}  # the small-vit recipe's
PRESET=${PRESET:-vit_cifar_9}
SET=${SET:-drop_path_rate=0.1}  # model hyper-parameters over the preset's
BATCH=${BATCH:-128}
EMA=${EMA:-0.9995}
COMPILE=${COMPILE---compile}  # COMPILE= (empty) for eager
ABLATE=${ABLATE:-0}
ABLATION_EPOCHS=${ABLATION_EPOCHS:-$EPOCHS}
BENCH=${BENCH:-1}  # BENCH=0: no speed measurements
TRAIN=${TRAIN:-1}  # TRAIN=0: tests and speed only (a first call, to size the run by the speeds seen)
LIMIT=${LIMIT:-}  # images per class, for a trial run
DATA=/tmp/vitdemo-data
export PYTHONUNBUFFERED=1

rm -rf "$RESULTS" /tmp/runs
mkdir -p "$OUT" "$DATA" "$RESULTS"
tar -xzf .device/cifar10-train.tar.gz -C "$DATA"
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee "$RESULTS/versions.txt"

if [ "$DEVICE" = cuda ]; then  # the tests that only a GPU runs, first: a broken GPU path shows here
    python3 -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_recipe.py -k "gpu or cuda" 2>&1 \
        | tail -15 | tee "$RESULTS/gpu_tests.txt" || true
fi
if [ "$DEVICE" = cuda ] && [ "$BENCH" = 1 ]; then
    {
        python3 benchmarks/engine_speed.py step --device cuda --batch 512 --compile reduce-overhead
        python3 benchmarks/engine_speed.py run --device cuda --batch 512 --recipe small-data --compile reduce-overhead
        if [ -d .device/old/vitdemo ]; then
            python3 benchmarks/engine_speed.py run --device cuda --batch 512 --recipe small-data --compile --code .device/old
        fi
    } 2>&1 | tee "$RESULTS/speed.txt" || true  # a failed measurement must not cost the training run
fi

limit=() eval_limit=() val_size=5000
if [ -n "$LIMIT" ]; then limit=(--max-images-per-class "$LIMIT"); eval_limit=(--limit 500); val_size=0.1; fi
train() {  # NAME EPOCHS [more train options]
    local name=$1 epochs=$2; shift 2
    # --force: /tmp/runs is this script's scratch, where a rehearsal's run of the same name is replaced.
    local cmd=(python3 -m vitdemo train --data "$DATA/cifar10/train" --preset "$PRESET" --set $SET
               --recipe small-vit --batch-size "$BATCH" --ema "$EMA" --epochs "$epochs" --val-size "$val_size"
               --split-seed 0 --seed 0 --out "/tmp/runs/$name" --force --device "$DEVICE" --log-every 1000
               "${limit[@]}" $COMPILE "$@")
    echo "${cmd[*]}" >> "$RESULTS/commands.txt"
    local start=$SECONDS
    OMP_NUM_THREADS=2 "${cmd[@]}" > "$RESULTS/$name.log" 2>&1 || echo "FAILED" >> "$RESULTS/$name.log"
    echo "$name: $(( SECONDS - start )) s" >> "$RESULTS/$name.log"
}
: > "$RESULTS/commands.txt"
pids=()
if [ "$ABLATE" = 1 ] && [ "$TRAIN" = 1 ]; then
    train without-autoaugment "$ABLATION_EPOCHS" --policy none & pids+=($!)
    train without-mixing "$ABLATION_EPOCHS" --mixup 0 --cutmix 0 & pids+=($!)
    train without-erasing "$ABLATION_EPOCHS" --erasing 0 & pids+=($!)
    train with-deit-repeats "$ABLATION_EPOCHS" --repeats 3 & pids+=($!)
    train crop-flip-only "$ABLATION_EPOCHS" --policy none --mixup 0 --cutmix 0 --erasing 0 & pids+=($!)
    train a-third-of-the-schedule "$(( ABLATION_EPOCHS > 2 ? ABLATION_EPOCHS / 3 : 1 ))" & pids+=($!)
    [ "$ABLATION_EPOCHS" != "$EPOCHS" ] && { train bundle-short "$ABLATION_EPOCHS" & pids+=($!); }
fi
[ "$TRAIN" = 1 ] && train main "$EPOCHS"
for pid in "${pids[@]}"; do wait "$pid" || true; done

for run in /tmp/runs/*/; do
    [ -d "$run" ] || continue
    name=$(basename "$run")
    {
        epochs=$(tr '\r' '\n' < "$RESULTS/$name.log" | grep '^Epoch' || true)
        echo "== $name: $(echo "$epochs" | grep -c . || true) epochs; last: $(echo "$epochs" | tail -1)"
        for weights in "$run" "$run/ema"; do
            [ -f "$weights/model.safetensors" ] || continue
            echo -n "$(basename "$weights"): "
            python3 -m vitdemo evaluate --checkpoint "$weights" --data "$DATA/cifar10/train" --val-size "$val_size" \
                --split-seed 0 --device "$DEVICE" "${eval_limit[@]}" 2>&1 | grep -v "^ "
        done
    } | tee -a "$RESULTS/evaluate.txt"
done
for run in /tmp/runs/*/; do
    [ -d "$run" ] || continue
    cp "$run/results.json" "$RESULTS/$(basename "$run").results.json" 2>/dev/null || true
done
cp /tmp/runs/main/curves.png "$RESULTS/" 2>/dev/null || true
tar -czf "$OUT/results.tar.gz" -C "$RESULTS" .
for f in model.safetensors ema/model.safetensors; do
    [ -f "/tmp/runs/main/$f" ] && split -b 15M -d "/tmp/runs/main/$f" "$OUT/${f//\//-}.part."
done
ls -la "$OUT"
cat "$RESULTS/evaluate.txt" 2>/dev/null || cat "$RESULTS"/*.txt
