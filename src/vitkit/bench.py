"""Throughput benchmark: vitkit against timm and HF transformers, same process, same device.

Every implementation is measured under one policy, so the ratios compare models, not setups:
  inference: eval mode, weights cast to the precision (bf16/fp16/fp32), no autocast, no grad;
  training:  float32 weights under `torch.autocast(precision)`, cross-entropy on random labels,
             backward, one AdamW step (the same `fast.make_adamw` for everyone);
  compile:   the same `torch.compile` mode for everyone, or eager for everyone.
vitkit's own speed levers (the attention kernel, `fast.py`) are applied to vitkit only: they are
what this benchmark measures; a row's `levers` field names them.

Timing: random inputs, warm-up steps excluded, CUDA events on a GPU (perf_counter on the CPU),
`steps` steps per repeat, the median of `repeats` repeats. MFU = achieved model FLOP/s over the
device's measured dense bf16 matmul rate (`measure_matmul_tflops`; on a CPU, the rate in the
row's own precision, as CPUs without bf16 units run bf16 slower, and in fp32 the faster of torch's
and onnxruntime's matmul), with model FLOPs from
`vitkit.model.count_flops` (forward; a training step counts 3x forward).

Memory: `peak_mem_gb` is the CUDA allocator's peak (None on the CPU, which has no such
allocator). `peak_rss_gb` is the process's peak resident set size, on every device: host RAM the
whole process holds (the Python runtime and libraries included, not the model alone). It is reset
before each row's timed run where Linux allows it (`peak_rss_scope` "run"); elsewhere it is the
high-water mark since the process started ("process"), which carries over from row to row.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig
from .errors import VitkitError
from .fast import SDPA_BACKENDS

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEERS = ("timm", "hf", "onnxruntime")  # onnxruntime: vitkit exported to ONNX, CPU fp32 inference
MODES = ("infer", "train")
FIELDS = ("impl", "mode", "model", "batch_size", "img_size", "precision", "compile", "device",
          "img_per_s", "step_ms", "mfu", "peak_mem_gb", "peak_rss_gb", "peak_rss_scope", "levers", "ratios")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss() -> str:
    """Start a new peak-RSS window; returns the scope `peak_rss_gb` will then have: "run" when
    the kernel's high-water mark was reset (Linux: writing 5 to /proc/self/clear_refs), else
    "process" (the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "run"
    except OSError:  # not Linux, or a sandbox that forbids it
        return "process"


def peak_rss_gb() -> float | None:
    """The process's peak resident set size in GiB: Linux's VmHWM (the mark clear_refs resets;
    getrusage's ru_maxrss also keeps the peaks of exited threads, so it cannot be reset), else
    getrusage's ru_maxrss (bytes on macOS); None where neither exists (Windows)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30


def time_steps(step: Callable[[], object], *, device: torch.device, steps: int, repeats: int,
               warmup: int) -> list[float]:
    """Seconds per step for each of `repeats` runs of `steps` calls of `step`, after `warmup`
    calls that are not timed. CUDA events time the device's work; on the CPU, perf_counter."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps)
    return times


def measure_matmul_tflops(*, device: torch.device | str, size: int | None = None, repeats: int = 5,
                          dtype: torch.dtype = torch.bfloat16) -> float:
    """The device's dense matmul rate in TFLOP/s (bf16 unless `dtype` says otherwise): an
    (n x n) @ (n x n) product on random data (zeros run faster than real data), median of
    `repeats` on a GPU, the fastest on the CPU. n defaults to 8192 on a GPU, 1024 on the CPU,
    where float32's rate is the faster of torch's and onnxruntime's (if installed)."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    steps = 10 if device.type == "cuda" else 2
    times = time_steps(lambda: a @ b, device=device, steps=steps, repeats=repeats, warmup=2)
    # A CPU shared with other work only ever slows a repeat, and a ceiling taken low sends MFU past
    # 100%: there the fastest repeat is the measurement.
    seconds = statistics.median(times) if device.type == "cuda" else min(times)
    rate = 2 * n ** 3 / seconds / 1e12
    if device.type == "cpu" and dtype == torch.float32:
        # torch's CPU matmul (MKL) need not use the widest vector units: on 2 AVX-512 AMD EPYC
        # cores it ran at half of onnxruntime's rate on the same threads, and the onnxruntime
        # row's MFU came out at 185%. The device can do what its fastest library does.
        rate = max(rate, _onnxruntime_matmul_tflops(n, repeats=repeats))
    return rate


def _onnxruntime_matmul_tflops(n: int, *, repeats: int) -> float:
    """onnxruntime's float32 (n x n) @ (n x n) rate on the CPU with torch's thread count, as
    `_measure_onnxruntime` runs; 0 where onnxruntime is not installed."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper
    except ImportError:
        return 0.0
    a, b, c = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "abc")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", [a, b], [c])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {"a": torch.randn(n, n).numpy(), "b": torch.randn(n, n).numpy()}
    seconds = min(time_steps(lambda: session.run(None, inputs), device=torch.device("cpu"), steps=2,
                             repeats=repeats, warmup=2))  # the fastest repeat, as for torch's on the CPU
    return 2 * n ** 3 / seconds / 1e12


# ---------------------------------------------------------------------------- the peers
def timm_name(config: ViTConfig) -> str:
    """timm's registered name for this architecture, or the base model's name when the
    architecture is not a standard one (the keyword overrides then make it this one)."""
    from .variants import SIZES

    for size in SIZES:
        if (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (
                size.embed_dim, size.depth, size.num_heads, size.mlp_dim) and config.patch_size[0] == config.patch_size[1]:
            # timm registers each at 224 px (some also at 384); `img_size=` builds the others.
            return f"vit_{size.name}_patch{config.patch_size[0]}_224"
    return "vit_base_patch16_224"


def _check_plain(config: ViTConfig, peer: str) -> None:
    plain = (config.class_token and config.global_pool == "token" and not config.reg_tokens
             and not config.distill_token and not config.hybrid_stem and config.init_values is None
             and not config.qk_norm and config.representation_size is None and config.prefix_pos_embed)
    if not plain:
        raise VitkitError(f"--peers {peer}: only the paper's plain ViT has a {peer} twin to compare with")


def build_timm(config: ViTConfig) -> nn.Module:
    """The same architecture from `timm.create_model`, randomly initialised (no download)."""
    import timm

    _check_plain(config, "timm")
    name = timm_name(config)
    return timm.create_model(
        name if timm.is_model(name) else "vit_base_patch16_224", pretrained=False, img_size=config.img_size, patch_size=config.patch_size,
        embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.embed_dim, qkv_bias=config.qkv_bias, num_classes=config.num_classes)


class _LogitsOnly(nn.Module):
    """HF models return an output object; the benchmark wants the logits tensor, like the others."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_hf(config: ViTConfig) -> nn.Module:
    """The same architecture as `transformers.ViTForImageClassification`, random init, SDPA attention."""
    import transformers

    _check_plain(config, "hf")
    if config.img_size[0] != config.img_size[1] or config.patch_size[0] != config.patch_size[1]:
        raise VitkitError("--peers hf: HF's ViT needs square images and patches")
    hf_config = transformers.ViTConfig(
        hidden_size=config.embed_dim, num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim, image_size=config.img_size[0], patch_size=config.patch_size[0],
        num_channels=config.in_chans, qkv_bias=config.qkv_bias, layer_norm_eps=config.norm_eps,
        num_labels=config.num_classes)
    hf_config._attn_implementation = "sdpa"
    return _LogitsOnly(transformers.ViTForImageClassification(hf_config))


# ---------------------------------------------------------------------------- one measurement
def _measure(*, impl: str, build: Callable[[], nn.Module], mode: str, config: ViTConfig, batch_size: int,
             dtype: torch.dtype, device: torch.device, compile: bool, compile_mode: str,
             grad_checkpointing: bool, sdpa_backend: str, steps: int, repeats: int, warmup: int,
             fp8: bool = False) -> dict:
    from .fast import attention_backends, make_adamw, optimize_for_inference, optimize_for_training

    backend = sdpa_backend if impl == "vitkit" else "default"
    fp8 = fp8 and impl == "vitkit"
    if compile:
        # Dynamo keeps the code it compiled for a forward method across model instances, at most
        # `recompile_limit` (8) versions; past that, later models run eagerly without an error,
        # and a long benchmark (benchmarks/throughput.py) would record eager rows as compiled.
        torch.compiler.reset()
    model = build().to(device)
    H, W = config.img_size
    x = torch.randn(batch_size, config.in_chans, H, W, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "infer":
        run = _optimize(optimize_for_inference, model, dtype=dtype, compile=compile, compile_mode=compile_mode,
                        sdpa_backend=backend, fp8=fp8)
        x = x.to(dtype)

        def step() -> object:
            with torch.inference_mode():
                return run(x)
    else:
        run = _optimize(optimize_for_training, model, compile=compile, compile_mode=compile_mode,
                        sdpa_backend=backend, grad_checkpointing=grad_checkpointing, fp8=fp8)
        optimizer = make_adamw(model.parameters(), lr=1e-4)
        labels = torch.randint(0, max(config.num_classes, 1), (batch_size,), device=device)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())

        def step() -> object:
            with autocast:
                loss = F.cross_entropy(run(x).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    scope = reset_peak_rss()
    seconds = statistics.median(time_steps(step, device=device, steps=steps, repeats=repeats, warmup=warmup))
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    rss = peak_rss_gb()
    levers = []
    chosen = attention_backends(backend, device=device)
    # Only a kernel this device has: on a CPU a CUDA kernel first in the list falls through.
    if chosen is not None and (device.type == "cuda" or chosen[0].name in ("FLASH_ATTENTION", "MATH")):
        levers.append(f"sdpa={chosen[0].name.lower()}")
    if grad_checkpointing and mode == "train":
        levers.append("grad-checkpointing")
    if fp8:
        levers.append("fp8")
    del model, run
    return {"impl": impl, "mode": mode, "step_ms": seconds * 1e3, "img_per_s": batch_size / seconds,
            "peak_mem_gb": peak, "peak_rss_gb": rss, "peak_rss_scope": scope, "levers": ",".join(levers) or "-"}


def _optimize(optimize: Callable[..., nn.Module], model: nn.Module, **options) -> nn.Module:
    """optimize(model, **options), with FP8's refusal (a device or widths it cannot take) as one line."""
    try:
        return optimize(model, **options)
    except ValueError as error:
        if not options.get("fp8"):
            raise
        raise VitkitError(f"--fp8: {error}") from None


def benchmark_throughput(*, model: str, batch_size: int = 64, precision: str = "bf16", compile: bool = False,
                         compile_mode: str = "default", peers: Sequence[str] = ("timm", "hf"),
                         img_size: int | None = None, device: str | None = None, steps: int = 10,
                         repeats: int = 5, warmup: int = 3, modes: Sequence[str] = MODES,
                         sdpa_backend: str = "auto", grad_checkpointing: bool = False,
                         num_classes: int | None = None, config: ViTConfig | None = None,
                         matmul_tflops: float | None = None, fp8: bool = False) -> list[dict]:
    """Images per second, MFU and peak memory of vitkit and each peer, for inference and for a
    full training step; one dict per (implementation, mode), with the fields in `FIELDS`.

    model: a variant name (ViT-B/16, vit_small_patch16_224, ...), or ignored when `config` is given.
    peers: any of 'timm', 'hf'; a peer whose package is missing is reported and skipped.
    ratios (vitkit rows): vitkit's img/s over each peer's, in the same mode.
    matmul_tflops: the bf16 matmul rate for MFU; measured on `device` when None.
    fp8: vitkit's blocks run their matmuls in FP8 (opt-in, changes the numbers; peers unchanged).
         Its MFU is still counted against the bf16 matmul rate, so that rows compare.
    With compile, torch.compiler.reset() runs before each row (its cache would otherwise fill and
    later rows run uncompiled): it also drops the compiled code of the caller's own models.
    """
    from .model import count_flops
    from .variants import resolve

    if precision not in PRECISIONS:
        raise VitkitError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    for flag, value, least in (("--batch-size", batch_size, 1), ("--steps", steps, 1), ("--repeats", repeats, 1),
                               ("--warmup", warmup, 0)):
        if value < least:
            raise VitkitError(f"{flag} {value}: must be at least {least}")
    if not modes:
        raise VitkitError(f"--modes: none given; expected a comma list of {', '.join(MODES)}")
    if compile and warmup < 1:
        warmup = 1  # else the first timed step would be the compilation
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise VitkitError(f"--peers: unknown peer {unknown[0]!r}; expected a comma list of {', '.join(PEERS)}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise VitkitError(f"--modes: unknown mode {bad_modes[0]!r}; expected {', '.join(MODES)}")
    if config is None:
        try:
            config = resolve(model)
        except ValueError as error:
            raise VitkitError(f"--model: {error}") from None
    changes = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if changes:
        try:
            config = config.replace(**changes)
        except ValueError as error:
            raise VitkitError(f"--img-size: {error}") from None
    if sdpa_backend not in SDPA_BACKENDS:
        raise VitkitError(f"--sdpa: expected one of {', '.join(SDPA_BACKENDS)}, got {sdpa_backend!r}")
    from .infer import resolve_device

    dev = resolve_device(device)
    dtype = PRECISIONS[precision]
    if fp8:
        from .fp8 import check_device

        try:
            check_device(dev)
        except ValueError as error:
            raise VitkitError(f"--fp8: {error}") from None

    from .model import VisionTransformer

    builders: dict[str, Callable[[], nn.Module]] = {"vitkit": lambda: VisionTransformer(config)}
    skipped = {}
    for peer in peers:
        try:
            __import__({"timm": "timm", "hf": "transformers", "onnxruntime": "onnxruntime"}[peer])
        except ImportError as error:
            skipped[peer] = f"not installed ({error})"
            continue
        if peer == "onnxruntime" and (dev.type != "cpu" or precision != "fp32"):
            skipped[peer] = "measured on the CPU in fp32 only"
            continue
        builders[peer] = {"timm": lambda: build_timm(config), "hf": lambda: build_hf(config),
                          "onnxruntime": lambda: VisionTransformer(config)}[peer]
    for peer, why in skipped.items():  # on stderr: stdout may be --json
        print(f"bench: skipping {peer}: {why}", file=sys.stderr)

    # MFU against the bf16 tensor-core rate on GPUs (the yardstick). On a CPU, the faster of
    # fp32 and the row's precision: a CPU without bf16/fp16 units runs those slower than fp32 in a
    # plain matmul, yet the model's own kernels may not, and MFU must stay below 1.
    if matmul_tflops:
        peak_tflops = matmul_tflops
    elif dev.type == "cuda":
        peak_tflops = measure_matmul_tflops(device=dev, dtype=torch.bfloat16)
    else:
        peak_tflops = max(measure_matmul_tflops(device=dev, dtype=d) for d in {dtype, torch.float32})
    flops = count_flops(config)["total"]
    rows = []
    for mode in modes:
        for impl, build in builders.items():
            torch.manual_seed(0)
            if impl == "onnxruntime" and mode != "infer":
                continue  # an inference runtime: no training step
            measure = _measure_onnxruntime if impl == "onnxruntime" else _measure
            try:
                row = measure(impl=impl, build=build, mode=mode, config=config, batch_size=batch_size,
                              dtype=dtype, device=dev, compile=compile, compile_mode=compile_mode,
                              grad_checkpointing=grad_checkpointing, sdpa_backend=sdpa_backend, steps=steps,
                              repeats=repeats, warmup=warmup, fp8=fp8)
            except Exception as error:  # a peer that breaks (out of memory, a compile error) loses its row only
                if impl == "vitkit":
                    raise
                print(f"bench: {impl} {mode} failed, no row: {type(error).__name__}: {str(error)[:200]}",
                      file=sys.stderr)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            step_flops = flops * (3 if mode == "train" else 1)
            row.update(model=model, batch_size=batch_size, img_size=config.img_size[0], precision=precision,
                       compile=compile_mode if compile else "eager", device=_device_name(dev),
                       mfu=row["img_per_s"] * step_flops / (peak_tflops * 1e12), matmul_tflops=peak_tflops)
            rows.append(row)
        vitkit = next(r for r in rows if r["impl"] == "vitkit" and r["mode"] == mode)
        vitkit["ratios"] = {r["impl"]: vitkit["img_per_s"] / r["img_per_s"]
                            for r in rows if r["mode"] == mode and r["impl"] != "vitkit"}
        for r in rows:
            r.setdefault("ratios", {})
    return [{k: r[k] for k in FIELDS + ("matmul_tflops",)} for r in rows]


def _measure_onnxruntime(*, build: Callable[[], nn.Module], config: ViTConfig, batch_size: int, steps: int,
                         repeats: int, warmup: int, **_: object) -> dict:
    """vitkit's model exported by `vitkit.export` and run by onnxruntime on the CPU, with as many
    threads as torch uses, so the two runtimes get the same cores."""
    import tempfile

    import onnxruntime

    from .export import export_model

    with tempfile.TemporaryDirectory() as folder:
        path = export_model(build(), format="onnx", out=f"{folder}/model.onnx").path
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(batch_size, config.in_chans, *config.img_size).numpy()
    name = session.get_inputs()[0].name
    scope = reset_peak_rss()
    seconds = statistics.median(time_steps(lambda: session.run(None, {name: x}), device=torch.device("cpu"),
                                           steps=steps, repeats=repeats, warmup=warmup))
    return {"impl": "onnxruntime", "mode": "infer", "step_ms": seconds * 1e3, "img_per_s": batch_size / seconds,
            "peak_mem_gb": None, "peak_rss_gb": peak_rss_gb(), "peak_rss_scope": scope, "levers": "-"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a fixed-width text table, one line per (implementation, mode)."""
    if not rows:
        return "(no results)"
    first = rows[0]
    lines = [f"{first['model']}  batch {first['batch_size']}  {first['img_size']} px  {first['precision']}  "
             f"{first['compile']}  on {first['device']}  ({'bf16' if 'cpu' not in first['device'] else first['precision']} "
             f"matmul {first['matmul_tflops']:.2f} TFLOP/s)",
             f"{'impl':<11} {'mode':<6} {'img/s':>10} {'step ms':>9} {'MFU':>6} {'peak GB':>8} {'RSS GB':>7}  "
             f"{'vs peers':<24} levers"]
    for r in rows:
        ratios = " ".join(f"{k}={v:.2f}x" for k, v in r["ratios"].items()) or "-"
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        # A '+' marks a process-lifetime high-water mark, which carries over from earlier rows.
        rss = ("-" if r["peak_rss_gb"] is None
               else f"{r['peak_rss_gb']:.2f}" + ("+" if r["peak_rss_scope"] == "process" else ""))
        lines.append(f"{r['impl']:<11} {r['mode']:<6} {r['img_per_s']:>10.1f} {r['step_ms']:>9.2f} "
                     f"{r['mfu'] * 100:>5.1f}% {peak:>8} {rss:>7}  {ratios:<24} {r['levers']}")
    since = ("; '+': since the process started, not this row's run"
             if any(r["peak_rss_scope"] == "process" for r in rows) else " during the row's run")
    lines.append(f"peak GB: the CUDA allocator's peak; RSS GB: the whole process's peak resident host memory{since}")
    return "\n".join(lines)


__all__ = ["benchmark_throughput", "measure_matmul_tflops", "time_steps", "format_table", "build_timm",
           "build_hf", "timm_name", "PRECISIONS", "PEERS", "FIELDS"]
