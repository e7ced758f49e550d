"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) on a batch, with soft targets.

Each batch draws its randomness from its own generator seeded by (seed, step, rank), so a
resumed run mixes exactly as the uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def soft_targets(labels: Tensor, *, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """(B,) int labels -> (B, K) float targets with label smoothing (Szegedy et al., 2016)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(images: Tensor, labels: Tensor, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              smoothing: float, seed: int, step: int, rank: int = 0) -> tuple[Tensor, Tensor]:
    """Mix a batch with its reverse: images (B, C, H, W), labels (B,) -> (images, targets (B, K)).

    With both alphas positive, each batch uses one of the two, chosen with even odds (as DeiT).
    CutMix's lambda is corrected to the pasted box's true area after clipping to the image.
    """
    targets = soft_targets(labels, num_classes=num_classes, smoothing=smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    rng = np.random.default_rng([seed, step, rank])
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    flipped = images.flip(0)
    if use_cutmix:
        H, W = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, H)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, W)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (H * W)
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


__all__ = ["soft_targets", "mix_batch"]
