"""CIFAR-10 time to accuracy: train a small ViT from scratch on the full CIFAR-10 JPEG archive and
print the test accuracy after every epoch against the seconds of training. The same command as
`vitkit bench cifar10`; the code is vitkit.time_to_accuracy.

    PYTHONPATH=src python benchmarks/cifar10.py --model vit_cifar_conv --time-budget 55
    PYTHONPATH=src python benchmarks/cifar10.py --model vit_cifar_conv --time-budget 280 --drop-path 0.1
    PYTHONPATH=src python benchmarks/cifar10.py --engine library --epochs 30   # through vitkit.train.train

Results (command, device, date, per-epoch accuracy and time): benchmarks/RESULTS.md, section
"CIFAR-10 time to accuracy", raw JSON lines in benchmarks/cifar10-results.jsonl; what was tried
and why: benchmarks/NOTES-cifar10.md.
"""

import sys

from vitkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "cifar10", *sys.argv[1:]]))
