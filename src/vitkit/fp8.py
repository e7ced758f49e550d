"""FP8 matmuls for the encoder's linear layers: an opt-in speed lever, not part of the paper's model.

Hopper's tensor cores multiply float8 matrices at twice their bf16 rate, and almost all of a
ViT's FLOPs are the four linear layers of each block (qkv, proj, fc1, fc2). `convert_to_fp8`
makes those four compute y = x W^T + b as a scaled FP8 matmul:

  * forward: x and W are cast to float8 e4m3 (3 mantissa bits, largest value 448), each with
    one scale chosen from the tensor's absolute maximum so its largest entry lands near 448
    ("dynamic per-tensor scaling"); the product accumulates in float32 and comes out in the
    autocast dtype;
  * backward: the incoming gradient is cast to e5m2 (2 mantissa bits, range to 57344), because
    gradients span more orders of magnitude than activations, and both gradients (input and
    weight) come from FP8 matmuls too;
  * without gradients (inference, validation) in bf16: one scale per row instead, per token for
    x and per output channel for W ("row-wise scaling"). Finer scales round less, and a token's
    largest value is a reduction over the same row as the LayerNorm or GELU that produced it, so
    compile can fuse scaling and cast into that kernel, where the per-tensor maximum needs a
    pass of its own. Training keeps per-tensor scales, which its backward matmuls need: they
    sum over the tokens, across which row-wise scales would vary.

Everything else (patch embedding, LayerNorm, softmax, GELU, residuals, head) keeps its precision,
and the parameters stay what they were (float32 master weights in training), so a model trains
and saves exactly as without FP8, to the rounding of the matmuls: tests/test_fp8.py measures it.
FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell);
the CPU runs the same arithmetic slowly, to check numbers. Compile the model: in eager mode the
casts and scale reductions are extra memory passes, which torch.compile can fuse into their
neighbours (on a GPU, not yet measured). The weights are cast on every call, not cached: for ViT-B/16 at batch 256 that is
under 1% of the step's memory traffic, and a cache could go stale when the weights change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Both sides of an FP8 matmul need dimensions divisible by 16 (cuBLASLt's rule); token counts
# such as 197 x batch are padded up to it, feature widths must already be multiples.
ALIGN = 16


def to_float8(t: Tensor, dtype: torch.dtype = E4M3, *, rowwise: bool = False) -> tuple[Tensor, Tensor]:
    """`t` scaled so its largest magnitude becomes the format's largest, in `dtype`, and the
    inverse scale (float32) that turns products back into the original units: a scalar, or with
    `rowwise` one per row of a matrix, shaped (rows, 1)."""
    largest = torch.finfo(dtype).max
    magnitude = t.detach().abs()
    amax = magnitude.amax(dim=-1, keepdim=True) if rowwise else magnitude.amax()
    amax = amax.float().clamp(min=1e-12)  # an all-zero tensor (or row) stays zero
    scale = largest / amax
    return (t.float() * scale).clamp(-largest, largest).to(dtype), scale.reciprocal()


def _column_major(t: Tensor) -> Tensor:
    """The same matrix laid out column by column, as the second operand of _scaled_mm must be."""
    return t.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """x @ W^T with x (M, K), W (N, K), M, N, K multiples of ALIGN, in FP8 both ways."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
        x8, x_inv = to_float8(x)
        w8, w_inv = to_float8(weight)
        # The FP8 copies are what the backward pass needs: they also halve the saved activations.
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, weight.dtype)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = to_float8(grad.contiguous(), E5M2)  # row-major, as _scaled_mm's first operand must be
        grad_x = torch._scaled_mm(g8, _column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad.dtype)
        # dW sums over every token of the batch: accumulate and return it in float32, not bf16.
        grad_w = torch._scaled_mm(g8.t().contiguous(), _column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in FP8 (see the module docstring). Same parameters and
    state-dict keys as nn.Linear, so checkpoints move freely between the two."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if x.numel() == 0:  # an empty shard of a batch has no largest value to scale by, nor any work
            bias = None if self.bias is None else self.bias.to(out_dtype)
            return F.linear(x.to(out_dtype), self.weight.to(out_dtype), bias)
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # _scaled_mm's first operand must be row-major
        padding = -rows.shape[0] % ALIGN
        if padding:
            rows = F.pad(rows, (0, 0, 0, padding))  # zero rows change neither amax nor the real rows
        if out_dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # Row-wise scaling (see the module docstring); CUDA has it for bf16 outputs only.
            x8, x_inv = to_float8(rows, rowwise=True)
            w8, w_inv = to_float8(self.weight, rowwise=True)
            y = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv.reshape(1, -1), out_dtype=out_dtype)
        else:
            y = _Float8Matmul.apply(rows, self.weight, out_dtype)
        if padding:
            y = y[: y.shape[0] - padding]
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def check_device(device: torch.device | str) -> None:
    """Raise ValueError where PyTorch has no FP8 matmul: CUDA GPUs before compute capability 8.9,
    and devices other than CUDA and the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    elif device.type != "cpu":
        raise ValueError(f"FP8 matmuls run on NVIDIA GPUs (compute capability 8.9 or newer) and the CPU, "
                         f"not on {device.type}")


def convert_to_fp8(model: nn.Module) -> int:
    """Swap every nn.Linear inside the encoder blocks (`model.blocks`) for a Float8Linear that
    shares its parameters, in place; returns how many of the blocks' linears now run in FP8
    (converting twice changes nothing). Build the optimizer before or after: the parameters are
    the same objects. Layers whose widths are not multiples of ALIGN stay as they are. Raises
    ValueError on a device without FP8 matmuls (`check_device`)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no encoder blocks (`.blocks`) to run in FP8")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        check_device(parameter.device)
    for parent in blocks.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.in_features % ALIGN or child.out_features % ALIGN:
                continue
            fp8 = Float8Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            fp8.weight, fp8.bias = child.weight, child.bias
            setattr(parent, name, fp8)
    converted = sum(isinstance(m, Float8Linear) for m in blocks.modules())
    if not converted:
        raise ValueError(f"no linear layer of {type(model).__name__}'s blocks has widths divisible by {ALIGN}")
    return converted


__all__ = ["convert_to_fp8", "check_device", "Float8Linear", "to_float8", "E4M3", "E5M2", "ALIGN"]
