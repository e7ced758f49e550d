#!/usr/bin/env bash
# Transfer benchmark: pre-train on five CIFAR-10 classes (airplane, automobile, bird, cat, deer),
# fine-tune on the other five (dog, frog, horse, ship, truck) with few labels, against training the
# same model from scratch on those few labels. Results: benchmarks/RESULTS.md, "Fine-tuning".
#
#   bash benchmarks/transfer.sh                     # 2 CPU cores: about 4 minutes
#   DEVICE=cuda PRE_PER_CLASS=5000 PRE=30 bash benchmarks/transfer.sh
set -euo pipefail
OUT=${OUT:-runs/bench-transfer}
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
PRE_PER_CLASS=${PRE_PER_CLASS:-2000}   # training images per class of the first five
FT_PER_CLASS=${FT_PER_CLASS:-500}      # training images per class of the last five: the scarce labels
VAL_PER_CLASS=${VAL_PER_CLASS:-500}    # test images per class, for both
PRE=${PRE:-10}                         # pre-training epochs
FT=${FT:-15}                           # epochs of both arms on the last five classes
DEVICE=${DEVICE:-cpu}
rm -rf "$OUT"
mkdir -p "$OUT"

# Two ImageFolder trees cut from the archive: first-five/ and last-five/, each with train/ and val/.
python3 - "$DATA" "$OUT" "$PRE_PER_CLASS" "$FT_PER_CLASS" "$VAL_PER_CLASS" <<'PY'
import sys, tarfile
from pathlib import Path
archive, out = sys.argv[1], Path(sys.argv[2])
pre, ft, val = map(int, sys.argv[3:])
classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
taken = {}
with tarfile.open(archive) as tar:
    for member in tar:
        parts = Path(member.name).parts
        if not member.isfile() or len(parts) < 3 or parts[-2] not in classes:
            continue
        split, label = parts[-3], parts[-2]
        first = classes.index(label) < 5
        limit = {"train": pre if first else ft, "test": val}.get(split, 0)
        key = (split, label)
        if taken.get(key, 0) >= limit:
            continue
        taken[key] = taken.get(key, 0) + 1
        target = out / ("first-five" if first else "last-five") / ("val" if split == "test" else "train") / label / parts[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tar.extractfile(member).read())
print("images per (split, class):", sorted(set(taken.values())), "in", len(taken), "folders")
PY

# 1. Supervised pre-training on the first five classes (the default small-image recipe and model).
vitkit train --data "$OUT/first-five" --epochs "$PRE" --device "$DEVICE" --no-progress --out "$OUT/pretrain"
# 2. The last five classes from scratch, and fine-tuned from step 1 (new head; the finetune recipe).
vitkit train --data "$OUT/last-five" --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/scratch"
vitkit train --init "$OUT/pretrain" --data "$OUT/last-five" --epochs "$FT" --device "$DEVICE" --no-progress --out "$OUT/finetune"
vitkit train --init "$OUT/pretrain" --recipe cifar --data "$OUT/last-five" --epochs "$FT" --device "$DEVICE" --no-progress \
    --out "$OUT/finetune-cifar-recipe"

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'arm':24s} {'images':>6s} {'epochs':>6s} {'best':>6s} {'final':>6s} {'seconds':>8s}")
for arm in ("pretrain", "scratch", "finetune", "finetune-cifar-recipe"):
    s = json.loads((out / arm / "summary.json").read_text())
    print(f"{arm:24s} {s['train_images']:6d} {s['epochs']:6d} {s['best_val_acc']:6.1%} {s['final_val_acc']:6.1%} "
          f"{s['wall_time_s']:8.0f}")
PY
