"""Build the CIFAR-10 sample shipped inside vitkit (src/vitkit/sample/cifar10_sample.npz).

    python scripts/make_sample.py ../shared/data/cifar10-jpeg.tar.gz

Draws 500 training and 100 test images per class (5,000 + 1,000) with a fixed seed and keeps
their original JPEG bytes, so the sample decodes to exactly the pixels of the shared copy.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "src" / "vitkit" / "sample" / "cifar10_sample.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="cifar10-jpeg.tar.gz (ImageFolder layout train/ and test/)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    with tarfile.open(args.archive) as archive:
        for info in archive:
            parts = info.name.split("/")
            if info.isfile() and len(parts) == 3 and parts[0] in files:
                files[parts[0]].setdefault(parts[1], []).append((parts[2], archive.extractfile(info).read()))
    class_names = sorted(files["train"])
    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names)}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        blobs, labels = [], []
        for label, name in enumerate(class_names):
            members = sorted(files[split][name])
            for i in np.sort(rng.choice(len(members), size=per_class, replace=False)):
                blobs.append(members[i][1])
                labels.append(label)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)  # JPEG bytes do not compress further
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"{len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test images")


if __name__ == "__main__":
    main()
