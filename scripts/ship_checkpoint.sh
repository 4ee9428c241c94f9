#!/usr/bin/env bash
# Ship a CIFAR-10 run's latest epoch as the default model: copy its weights to
# checkpoints/vit_cifar10, re-export the int8 ONNX file tied to them, evaluate both on the 5,000
# held-out images, and redraw the README's pictures. Then update checkpoints/README.md by hand, and
# measure the explanations again (`python benchmarks/faithfulness.py`: the app shows its table only
# while checkpoints/vit_cifar10/faithfulness.json names the shipped weights' digest). A run from the
# `vitdemo train` carries its out-of-distribution statistics and its data's digest (by which evaluate
# finds the held-out images); for an older one, `vitdemo fit-ood` adds the statistics.
#
#     bash scripts/ship_checkpoint.sh [RUN_DIR_OR_WEIGHTS_FILE] [CIFAR10_TRAIN_DIR]
#
# From a device session, give the file chosen.json names, e.g. /work/.device/.../main.ema.safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-$HOME/.cache/vitdemo/runs/cifar10}
data=${2:-$HOME/.cache/vitdemo/cifar10/train}
dest=checkpoints/vit_cifar10
split=(--data "$data" --val-size 5000 --split-seed 0)

weights=$run
[ -d "$run" ] && weights=$run/model.safetensors
install -m 644 "$weights" "$dest/model.safetensors"
# --force: the previous model's export, evaluation and pictures are meant to be replaced here.
python -m vitdemo export --checkpoint "$dest" --out "$dest/model.int8.onnx" --int8 --force
python -m vitdemo evaluate --checkpoint "$dest" "${split[@]}" --out "$dest" --force
python -m vitdemo evaluate --checkpoint "$dest" "${split[@]}" --runtime int8 --onnx "$dest/model.int8.onnx" | head -2
python -m vitdemo explain docs/examples/ship.png --checkpoint "$dest" --out docs/explain --force
