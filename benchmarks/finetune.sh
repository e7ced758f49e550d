#!/usr/bin/env bash
# Fine-tuning benchmark: does MAE pre-training (He et al., 2021) on the CIFAR-10 sample's 5,000
# training images, labels unused, beat training the same ViT from scratch on the same labelled
# images? Two comparisons: the same number of supervised epochs, and the same total compute time
# (the scratch arm gets the MAE run's wall time as extra epochs).
# Results: benchmarks/RESULTS.md, "Fine-tuning".
#
#   bash benchmarks/finetune.sh                            # PRE=100 FT=30 on a GPU: a few minutes
#   PRE=20 FT=10 DEVICE=cpu bash benchmarks/finetune.sh    # 2 CPU cores: about 35 minutes
set -euo pipefail
OUT=${OUT:-runs/bench-finetune}
PRE=${PRE:-100}     # MAE pre-training epochs
FT=${FT:-30}        # supervised epochs of the equal-epoch arms
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-vit_cifar}
FRESH=()            # options for the fresh models only, e.g. PATCH=8 for a quicker CPU run
if [[ -n "${PATCH:-}" ]]; then FRESH=(--patch-size "$PATCH"); fi
rm -rf "$OUT"
mkdir -p "$OUT"
# Median seconds per epoch, times the epochs: a shared machine's slow epochs do not tip the balance.
epoch_time() {
    python3 - "$1" <<'PY'
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
if "seconds" in rows[0]:  # vitkit pretrain: one row per epoch with its seconds
    seconds = [r["seconds"] for r in rows]
else:  # vitkit train: epoch rows carry the cumulative training time
    elapsed = [r["elapsed_s"] for r in rows if r.get("kind") == "epoch"]
    seconds = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
print(statistics.median(seconds) * len(seconds))
PY
}

# 1. MAE pre-training, labels ignored. LR 1e-3 per 256 images: MAE's 1.5e-4 assumes 800+ epochs of ImageNet.
vitkit pretrain --method mae --model "$MODEL" "${FRESH[@]}" --epochs "$PRE" --batch-size 256 --lr 1e-3 --warmup-epochs 5 \
    --device "$DEVICE" --out "$OUT/mae"

# 2. The supervised arms, each on the 5,000 labelled images, evaluated on the sample's 1,000 test images.
vitkit train --model "$MODEL" "${FRESH[@]}" --recipe cifar --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/scratch"
vitkit train --init "$OUT/mae" --recipe cifar --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/mae-cifar-recipe"
vitkit train --init "$OUT/mae" --recipe finetune --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/mae-finetune-recipe"

# 3. Scratch at the same total time as MAE + fine-tuning: FT epochs plus as many as the MAE run's time buys.
SAME=$(python3 -c "import sys; mae, sc, ft = map(float, sys.argv[1:]); print(int(ft + round(mae / (sc / ft))))" \
    "$(epoch_time "$OUT/mae")" "$(epoch_time "$OUT/scratch")" "$FT")
vitkit train --model "$MODEL" "${FRESH[@]}" --recipe cifar --epochs "$SAME" --device "$DEVICE" --no-progress --out "$OUT/scratch-same-time"

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
mae = json.loads((out / "mae" / "summary.json").read_text())
print(f"{'arm':22s} {'epochs':>6s} {'best':>6s} {'final':>6s} {'seconds':>8s}")
print(f"{'mae pre-training':22s} {mae['epochs']:6d} {'':>6s} {'':>6s} {mae['wall_time_s']:8.0f}")
for arm in ("scratch", "mae-cifar-recipe", "mae-finetune-recipe", "scratch-same-time"):
    s = json.loads((out / arm / "summary.json").read_text())
    print(f"{arm:22s} {s['epochs']:6d} {s['best_val_acc']:6.1%} {s['final_val_acc']:6.1%} {s['wall_time_s']:8.0f}")
PY
