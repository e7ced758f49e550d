#!/usr/bin/env bash
# make demo: build a ViT by name and show what it is.
set -euo pipefail
vitkit info ViT-B/16
