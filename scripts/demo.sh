#!/usr/bin/env bash
# make demo: build a ViT by name and show what it is.
set -euo pipefail
vitkit info ViT-B/16
# Speed against timm on this machine (tiny settings so the demo stays quick; see benchmarks/RESULTS.md).
vitkit bench throughput --model ViT-Ti/16 --batch-size 4 --precision fp32 --peers timm --modes infer --steps 2 --repeats 3
# One ONNX file for any batch and resolution, checked against PyTorch at two sizes.
vitkit export ViT-Ti/16 --format onnx --out "${TMPDIR:-/tmp}/vit_tiny.onnx"
