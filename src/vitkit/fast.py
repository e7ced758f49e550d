"""Speed-only machinery: the same ViT, run faster. Nothing here changes what a model computes
beyond the rounding of the dtype it is asked to run in, except the opt-in FP8 matmuls.

The levers, measured in benchmarks/RESULTS.md (## Throughput) unless said otherwise:
  * pure bf16/fp16 weights for inference (`model.to(dtype)`): no autocast casts on every call;
  * the attention kernel (`torch.nn.attention.sdpa_kernel`): cuDNN's fused attention first on
    Hopper, where PyTorch's default order tries FlashAttention-2 first;
  * torch.compile, which fuses LayerNorm, GELU, bias adds and residuals into the matmuls'
    neighbours; its mode picks autotuned matmuls and CUDA graphs (useful at small batches);
  * gradient checkpointing for models whose activations do not fit;
  * the fused (single-kernel) AdamW;
  * opt-in FP8 matmuls in the encoder blocks (`fp8=True`, see fp8.py), made for FP8 tensor
    cores (twice the bf16 rate on Hopper) at the price of e4m3/e5m2 rounding in those matmuls,
    which does change the numbers (measured: tests/test_fp8.py, RESULTS.md); their speed is not
    measured yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

SDPA_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def attention_backends(name: str, *, device: torch.device | str) -> list | None:
    """The SDPA kernels to allow, in priority order, for `name` on `device`; None keeps PyTorch's
    own choice. 'auto' puts cuDNN first on compute capability 9.x (Hopper), the default elsewhere."""
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(SDPA_BACKENDS)}")
    device = torch.device(device)
    if name == "default" or (name == "auto" and not _is_hopper(device)):
        return None
    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = "cudnn" if name == "auto" else name
    # The rest stay allowed as fallbacks (an unsupported dtype or head size), after the choice.
    return [table[first]] + [b for k, b in table.items() if k != first]


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9


class AttentionBackend(nn.Module):
    """Run the wrapped model with a chosen list of SDPA kernels. Dynamo traces the context
    manager, so a compiled wrapper bakes the choice into its graph."""

    def __init__(self, model: nn.Module, backends: Sequence) -> None:
        super().__init__()
        self.model = model
        self.backends = list(backends)

    def forward(self, x: Tensor) -> Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backends, set_priority=True):
            return self.model(x)


def _wrap(model: nn.Module, *, device: torch.device, sdpa_backend: str, compile: bool,
          compile_mode: str) -> nn.Module:
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    backends = attention_backends(sdpa_backend, device=device)
    if backends is not None:
        model = AttentionBackend(model, backends)
    if compile:
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    return model


def optimize_for_inference(model: nn.Module, *, dtype: torch.dtype | None = None, compile: bool = False,
                           compile_mode: str = "default", sdpa_backend: str = "auto", fp8: bool = False) -> nn.Module:
    """Put `model` in eval mode without gradients, cast its weights to `dtype` (inputs must then
    come in that dtype too), choose the attention kernel and optionally compile it; `fp8` runs
    the blocks' linear layers in FP8.

    Returns a module computing the same logits as `model` (to the rounding of `dtype`, and of FP8
    where asked); the original module is modified in place (cast, frozen), and the returned one
    may wrap it.
    """
    model.eval().requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    if fp8:
        from .fp8 import convert_to_fp8

        convert_to_fp8(model)
    device = next(model.parameters()).device
    return _wrap(model, device=device, sdpa_backend=sdpa_backend, compile=compile, compile_mode=compile_mode)


def optimize_for_training(model: nn.Module, *, compile: bool = False, compile_mode: str = "default",
                          sdpa_backend: str = "auto", grad_checkpointing: bool = False, fp8: bool = False) -> nn.Module:
    """Put `model` in train mode, optionally with gradient checkpointing (activations of each
    block recomputed in the backward pass: less memory for ~30% more compute) and FP8 matmuls
    in the blocks, choose the attention kernel and optionally compile it. Keep the weights
    float32 and train under `torch.autocast` for mixed precision; build the optimizer with
    `make_adamw` on the original module's parameters (the wrapper shares them)."""
    model.train()
    if fp8:
        from .fp8 import convert_to_fp8

        convert_to_fp8(model)
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    device = next(model.parameters()).device
    return _wrap(model, device=device, sdpa_backend=sdpa_backend, compile=compile, compile_mode=compile_mode)


def make_adamw(params, *, lr: float = 1e-3, weight_decay: float = 0.05,
               betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where PyTorch has that kernel (CUDA, CPU) for the
    parameters' device; the update is the same as the per-tensor loop's to float rounding."""
    params = list(params)
    device = params[0].device.type if params and isinstance(params[0], Tensor) else "cpu"
    fused = device in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)


__all__ = ["optimize_for_inference", "optimize_for_training", "make_adamw", "attention_backends",
           "AttentionBackend", "SDPA_BACKENDS", "COMPILE_MODES"]
