"""The optimiser and the learning-rate schedule of the training recipes.

AdamW with decoupled weight decay (Loshchilov & Hutter, 2019), as DeiT and the paper's
fine-tuning use; weight decay skips norms, biases, tokens and position embeddings, whose
scale carries meaning. Layer-wise LR decay (BEiT, Bao et al., 2022) scales each block's LR by
decay ** (distance from the head), so fine-tuning moves the early layers least.
The schedule is a pure function of the optimiser step, so resuming needs only the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Parameters that are embeddings, not weights: decaying them towards zero has no regularising sense.
_NO_DECAY_NAMES = ("cls_token", "dist_token", "reg_token", "pos_embed")


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the heads."""
    name = name.removeprefix("module.").removeprefix("_orig_mod.")
    if name.startswith(("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float | None = None,
                 depth: int | None = None) -> list[dict[str, Any]]:
    """Split the trainable parameters into AdamW groups: (decay or not) x (layer, with layer decay).
    Each group carries `lr_scale`, which `set_lr` multiplies into the scheduled LR."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    if layer_decay is not None and depth is None:
        raise ValueError("layer_decay needs the model's depth")
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(token in name for token in _NO_DECAY_NAMES)
        layer = _layer_id(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float | None = None,
                    depth: int | None = None, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `param_groups`, using the fused CUDA kernel when every parameter is on a GPU."""
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay, depth=depth)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if on_cuda else None)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The LR at optimiser step `step` (0-based): linear warmup from ~0 to base_lr over
    warmup_steps, then a half cosine down to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the scheduled LR to every group, times the group's layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = ["param_groups", "build_optimizer", "lr_at", "set_lr"]
