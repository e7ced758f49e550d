#!/usr/bin/env bash
# Fine-tuning benchmark: does MAE pre-training (He et al., 2021) on the CIFAR-10 sample's 5,000
# training images, labels unused, beat training the same ViT from scratch on the same labelled
# images, for the same number of fine-tuning epochs? Results: benchmarks/RESULTS.md, "Fine-tuning".
#
#   bash benchmarks/finetune.sh                 # PRE=100 FT=30 on a GPU: a few minutes
#   PRE=10 FT=5 PATCH=8 DEVICE=cpu bash benchmarks/finetune.sh   # CPU: 8x8 patches, 17 tokens
set -euo pipefail
OUT=${OUT:-runs/bench-finetune}
PRE=${PRE:-100}     # MAE pre-training epochs
FT=${FT:-30}        # supervised epochs, the same for every arm
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit_cifar}
FRESH=()            # options for the fresh models only, e.g. PATCH=8 for a quicker CPU run
if [[ -n "${PATCH:-}" ]]; then FRESH=(--patch-size "$PATCH"); fi
mkdir -p "$OUT"

# 1. MAE pre-training, labels ignored. LR 1e-3 per 256 images: MAE's 1.5e-4 assumes 800+ epochs of ImageNet.
vitkit pretrain --method mae --model "$MODEL" "${FRESH[@]}" --epochs "$PRE" --batch-size 256 --lr 1e-3 --warmup-epochs 5 \
    --device "$DEVICE" --out "$OUT/mae"

# 2. The three supervised arms, each on the 5,000 labelled images, evaluated on the sample's 1,000 test images.
vitkit train --model "$MODEL" "${FRESH[@]}" --recipe cifar --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/scratch"
vitkit train --init "$OUT/mae" --recipe cifar --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/mae-cifar-recipe"
vitkit train --init "$OUT/mae" --recipe finetune --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/mae-finetune-recipe"

for arm in scratch mae-cifar-recipe mae-finetune-recipe; do
    python -c "import json,sys; s=json.load(open('$OUT/$arm/summary.json')); print('$arm', {k: s[k] for k in s if 'acc' in k or 'time' in k or 'second' in k})"
done
