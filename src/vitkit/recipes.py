"""Named training recipes: hyperparameters that work together, each with the command that runs it
and the result it reached (big_vision's habit). Any TrainConfig field set explicitly wins over
the recipe. configs/<name>.md holds the longer story of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    command: str  # the command that reproduces `result`
    result: str  # what that command reached, where, and how long it took
    values: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields


RECIPES: dict[str, Recipe] = {}


def _register(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe


# The default model for 32-px images without --model: the paper's hybrid at small scale (Sec. 3.1),
# sized for a CPU. Three 3x3 conv layers take 32x32 to an 8x8x128 map, cut into 2x2 patches:
# 16 tokens of width 128, 4 blocks; 0.7M parameters, ~40 MFLOPs per image.
SMALL_HYBRID = dict(patch_size=2, embed_dim=128, depth=4, num_heads=4, mlp_dim=256,
                    hybrid_stem={"type": "conv", "stride": 4, "channels": [32, 64, 128], "strides": [1, 2, 2],
                                 "norm": "batch"})

# Small images from scratch. A ViT has no locality prior, so on a few thousand 32-px images it
# needs strong regularisation of the cheap kind: crop+flip, label smoothing, a short warmup and a
# high LR; mixup and RandAugment pay off only over hundreds of epochs (DeiT, Table 8), not here.
_register(Recipe(
    name="cifar",
    summary="small images (32 px) from scratch: the default without --init",
    command="vitkit train   (no --data: the embedded 5,000-image CIFAR-10 sample)",
    result="20 epochs (the default): 48.0% test accuracy in 98 s on 2 idle CPU cores (1,126 img/s); 25 epochs on an H100 (fp32): "
           "56.9% in 35 s. configs/cifar.md has the table",
    values=dict(model="vit_cifar_conv", model_overrides=SMALL_HYBRID, epochs=20, batch_size=128, lr=3e-3, min_lr=1e-5, weight_decay=0.05,
                warmup_epochs=1.0, label_smoothing=0.1, augment=None, mixup=0.0, cutmix=0.0,
                random_erasing=0.0, drop_path=0.0, clip_grad=1.0, ema=None, layer_decay=None),
))

# Fine-tuning a pre-trained ViT (paper Sec. 3.2 and Appendix B.1.1 use SGD; AdamW with layer-wise
# decay, as BEiT and MAE fine-tune, is less sensitive to the LR). Short warmup, low LR.
_register(Recipe(
    name="finetune",
    summary="fine-tune a pre-trained model (--init): low LR, short warmup, layer-wise LR decay",
    command="vitkit train --recipe finetune --init RUN_OR_CHECKPOINT --data DATA",
    result="MAE (20 ep on the 5,000-image sample) then 10 ep: 46.9% vs 38.8% from scratch; five CIFAR-10 "
           "classes -> the other five, 2,500 labels, 15 ep: 72.2% vs 65.0% (2 CPU cores); configs/finetune.md",
    values=dict(epochs=10, batch_size=64, lr=3e-4, min_lr=1e-6, weight_decay=0.05, warmup_epochs=0.5,
                label_smoothing=0.1, augment=None, mixup=0.0, cutmix=0.0, random_erasing=0.0, drop_path=0.1,
                clip_grad=1.0, ema=None, layer_decay=0.75),
))

# DeiT's ImageNet recipe (Touvron et al., 2021, Table 9) for large data sets from scratch.
_register(Recipe(
    name="deit",
    summary="DeiT's from-scratch recipe for large data sets (ImageNet-scale): strong augmentation",
    command="torchrun --nproc-per-node 8 -m vitkit train --recipe deit --model ViT-S/16 --data IMAGENET",
    result="not run in vitkit (DeiT reports 79.8% top-1 for ViT-S/16 at 300 epochs)",
    values=dict(epochs=300, batch_size=1024, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=5.0,
                label_smoothing=0.1, augment="randaugment", mixup=0.8, cutmix=1.0, random_erasing=0.25,
                drop_path=0.1, clip_grad=None, ema=None, layer_decay=None),
))


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name lists the known ones."""
    from .errors import VitkitError

    if name not in RECIPES:
        raise VitkitError(f"--recipe {name!r}: unknown recipe; known: {', '.join(RECIPES)}")
    return RECIPES[name]


__all__ = ["Recipe", "RECIPES", "get_recipe"]
