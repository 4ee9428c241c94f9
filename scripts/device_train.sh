#!/usr/bin/env bash
# One GPU session's whole job for the CIFAR-10 model, in one call of the device tool (which runs
# it over a copy of this working tree and brings back what is written under $OUT):
#
#   1. speed: benchmarks/engine_speed.py on the GPU (this engine eager and compiled against timm's
#      same step; the whole loop with and without the fast path) and, when .device/old holds an
#      earlier vitdemo package, that engine's loop on the same recipe: the before/after ratio
#   2. train: the small-vit recipe from scratch on the 45,000 training images (5,000 held out,
#      split seed 0), with the command printed and kept in $OUT/command.txt
#   3. evaluate the trained and the moving-average weights on the held-out images; return the run
#
# Prepare here (nothing in .device is committed):
#   echo /.device/ >> .git/info/exclude; mkdir -p .device
#   cp ../shared/data/cifar10-train.tar.gz .device/
#   git worktree add /tmp/old 522957b && cp -r /tmp/old/vitdemo .device/old/   # optional baseline
# and call the device tool with carry [".device"] and the command `bash scripts/device_train.sh`.
# Test it here first on the CPU with a tiny budget:
#   OUT=/tmp/device-out EPOCHS=1 LIMIT=200 DEVICE=cpu bash scripts/device_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-100}
PRESET=${PRESET:-vit_cifar_9}
EMA=${EMA:-0.9995}
COMPILE=${COMPILE---compile}  # COMPILE= (empty) for eager
LIMIT=${LIMIT:-}  # images per class, for a trial run
DATA=/tmp/vitdemo-data
export PYTHONUNBUFFERED=1

mkdir -p "$OUT" "$DATA"
tar -xzf .device/cifar10-train.tar.gz -C "$DATA"
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"

if [ "$DEVICE" = cuda ]; then
    {
        python3 benchmarks/engine_speed.py step --device cuda --batch 512
        python3 benchmarks/engine_speed.py step --device cuda --batch 512 --preset "$PRESET"
        python3 benchmarks/engine_speed.py run --device cuda --batch 512 --recipe small-data
        if [ -d .device/old/vitdemo ]; then
            python3 benchmarks/engine_speed.py run --device cuda --batch 512 --recipe small-data --compile --code .device/old
        fi
    } 2>&1 | tee "$OUT/speed.txt" || true  # a failed measurement must not cost the training run
fi

limit=() eval_limit=() val_size=5000
if [ -n "$LIMIT" ]; then limit=(--max-images-per-class "$LIMIT"); eval_limit=(--limit 500); val_size=0.1; fi
cmd=(python3 -m vitdemo train --data "$DATA/cifar10/train" --preset "$PRESET" --set drop_path_rate=0.1
     --recipe small-vit --ema "$EMA" --epochs "$EPOCHS" --val-size "$val_size" --split-seed 0 --seed 0
     --out /tmp/run --device "$DEVICE" --log-every 100 "${limit[@]}" $COMPILE)
echo "${cmd[*]}" | tee "$OUT/command.txt"
start=$(date +%s)
"${cmd[@]}" 2>&1 | tee "$OUT/train.log" | grep -v "steps \[" || true
echo "training took $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"

for weights in /tmp/run /tmp/run/ema; do
    [ -f "$weights/model.safetensors" ] || continue
    python3 -m vitdemo evaluate --checkpoint "$weights" --data "$DATA/cifar10/train" --val-size "$val_size" \
        --split-seed 0 --device "$DEVICE" "${eval_limit[@]}" 2>&1 | tee -a "$OUT/evaluate.txt"
done
mkdir -p "$OUT/run" "$OUT/run/ema"
cp /tmp/run/model.safetensors /tmp/run/results.json /tmp/run/curves.png "$OUT/run/" 2>/dev/null || true
cp /tmp/run/ema/model.safetensors "$OUT/run/ema/" 2>/dev/null || true
ls -la "$OUT" "$OUT/run"
