"""Every GPU row of benchmarks/RESULTS.md (## Throughput) in one process, most important first.

    PYTHONPATH=src python3 benchmarks/throughput.py [OUT_DIR [FIRST]]

Prints each table as it finishes (a configuration or mode that fails prints its error and the run
goes on) and appends the rows to OUT_DIR/throughput.jsonl. All of it takes longer than one
10-minute GPU call: FIRST, the index printed before a configuration, starts a second call there
(without the correctness checks, which the first call printed).
"""

import json
import os
import sys
import time
import traceback

import torch

from vitkit.bench import MODES, benchmark_throughput, format_table, measure_matmul_tflops
from vitkit.fast import optimize_for_inference, optimize_for_training
from vitkit.model import VisionTransformer
from vitkit.variants import resolve

CONFIGS = [
    dict(model="ViT-B/16", batch_size=256, compile=True, peers=["timm"], fp8=True),
    dict(model="ViT-B/16", batch_size=256, compile=True),
    dict(model="ViT-L/16", batch_size=256, compile=True, peers=["timm"], grad_checkpointing=True, modes=["train"]),
    dict(model="ViT-S/16", batch_size=256, compile=True, peers=["timm"]),
    dict(model="ViT-B/16", batch_size=256, compile=False),
    dict(model="ViT-B/16", batch_size=256, compile=True, peers=[], sdpa_backend="default"),
    dict(model="ViT-L/16", batch_size=256, compile=True, peers=["timm"], modes=["infer"]),
    dict(model="ViT-B/16", batch_size=8, compile=True, peers=["timm"], modes=["infer"], compile_mode="reduce-overhead"),
    dict(model="ViT-L/16", batch_size=256, compile=True, peers=["timm"], modes=["infer"], fp8=True),
    dict(model="ViT-S/16", batch_size=256, compile=True, peers=["timm"], fp8=True),
]

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
if not 0 <= first < len(CONFIGS):
    sys.exit(f"FIRST {first}: the configs are numbered 0 to {len(CONFIGS) - 1}")
log = open(os.path.join(out_dir, "throughput.jsonl"), "a")
print(torch.__version__, torch.cuda.get_device_name(), flush=True)

tflops = measure_matmul_tflops(device="cuda")
print(f"bf16 matmul 8192^3: {tflops:.0f} TFLOP/s", flush=True)

if first == 0:
    # Correctness on the GPU: the fast path (bf16 weights, cuDNN attention) against fp32 (tf32 off).
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_model = VisionTransformer(resolve("ViT-B/16")).cuda().eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = ref_model(x).double()
        for backend in ("cudnn", "flash", "default"):
            import copy
            fast = optimize_for_inference(copy.deepcopy(ref_model), dtype=torch.bfloat16, sdpa_backend=backend)
            got = fast(x.bfloat16()).double()
            print(f"fast path sdpa={backend}: rel. error vs fp32 {float((got - ref).norm() / ref.norm()):.2e}", flush=True)

    # FP8 (opt-in): the rounding it adds on this GPU, and one training step through its backward.
    # A failure here is printed and the table rows still run.
    try:
        with torch.no_grad():
            fast = optimize_for_inference(copy.deepcopy(ref_model), dtype=torch.bfloat16, fp8=True)
            got = fast(x.bfloat16()).double()
        print(f"fp8 inference: rel. error vs fp32 {float((got - ref).norm() / ref.norm()):.2e}", flush=True)
        train_model = optimize_for_training(copy.deepcopy(ref_model).requires_grad_(True), fp8=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_model(x).float().logsumexp(1).mean().backward()
        finite = all(p.grad.isfinite().all() for p in train_model.parameters() if p.grad is not None)
        print(f"fp8 training step: gradients finite: {finite}", flush=True)
    except Exception:
        print(f"FP8 CHECK FAILED\n{traceback.format_exc()[-1500:]}", flush=True)
    finally:
        train_model = None  # free the GPU for the table rows, whatever happened
    del ref_model, fast

tables = []
for index, config in enumerate(CONFIGS[first:], first):
    print(f"[{index}] {config}", flush=True)
    # One mode at a time: benchmark_throughput raises when vitkit's row fails, which would lose
    # the rows of the other mode too (FP8 training failing after FP8 inference was measured).
    for mode in config.get("modes", MODES):
        t0 = time.time()
        try:
            rows = benchmark_throughput(precision="bf16", matmul_tflops=tflops, steps=10, repeats=5,
                                        **{**config, "modes": [mode]})
        except Exception:
            print(f"FAILED {mode} {config}\n{traceback.format_exc()[-1500:]}", flush=True)
            continue
        for row in rows:
            log.write(json.dumps({**row, "config": config}) + "\n")
        log.flush()  # a call cut off at its time limit keeps every row measured before
        table = format_table(rows) + f"\n  ([{index}] {mode} {config}, {time.time() - t0:.0f} s)"
        tables.append(table)
        print(table, flush=True)
print("\n\n".join(tables))
