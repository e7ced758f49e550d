"""A small convolutional stem for ViTs on small images, and the named small-image models.

The paper's hybrid (Dosovitskiy et al., 2021, Sec. 3.1, "Hybrid Architecture") feeds the
transformer a CNN feature map instead of raw pixel patches; with a 1x1 "patch" each feature-map
position becomes a token. On small data sets a few 3x3 convolutions in front of the patch
projection give the model the locality prior a plain ViT lacks, and it learns far faster
(Xiao et al., 2021, "Early Convolutions Help Transformers See Better").

The stem is selected by `ViTConfig.hybrid_stem`:

    {"type": "conv", "stride": 4, "channels": [64, 128, 256], "strides": [1, 2, 2], "norm": "batch",
     "downsample": "maxpool"}

  channels  output channels of each 3x3 conv + norm + GELU layer
  strides   each layer's stride (1 or 2); their product must equal `stride`. Left out, the last
            log2(stride) layers downsample, so the first layers see full resolution
  stride    the stem's total downsampling; `ViTConfig.stem_stride` = patch_size * stride
  norm      "batch" (fastest, the default) or "group" (batch-size independent, 8 groups)
  downsample  how a stride-2 layer halves the map: "stride" (the default: the conv itself strides)
            or "maxpool" (the conv runs at full resolution, then a 2x2 max-pool, as in airbench's
            CIFAR-10 nets: 4x the conv's FLOPs, and on small data it learns far more per epoch;
            configs/cifar.md). Neither adds parameters, so the weights are the same either way.

Then `proj`, a P x P convolution with stride P (the paper's patch projection, Eq. 1), maps the
feature map to width D, exactly as `PatchEmbed` does for pixels.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .config import ViTConfig
from .variants import register_model

_KEYS = {"type", "stride", "channels", "strides", "norm", "downsample"}
_NORMS = ("batch", "group")
_DOWNSAMPLES = ("stride", "maxpool")


def _spec(config: ViTConfig) -> tuple[list[int], list[int], str, str]:
    """Validate `config.hybrid_stem`; return (channels, strides, norm, downsample). Errors name the key."""
    spec: dict[str, Any] = dict(config.hybrid_stem or {})
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ValueError(f"ViTConfig.hybrid_stem: unknown keys {unknown} for a conv stem; known: {sorted(_KEYS)}")
    stride = spec.get("stride", 1)
    channels = spec.get("channels")
    if not isinstance(channels, (list, tuple)) or not channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ValueError(f"ViTConfig.hybrid_stem['channels']: must be a non-empty list of positive ints (got {channels!r})")
    if not isinstance(stride, int) or stride < 1 or stride & (stride - 1):
        raise ValueError(f"ViTConfig.hybrid_stem['stride']: must be a power of two >= 1 (got {stride!r})")
    strides = spec.get("strides")
    if strides is None:
        halvings = int(math.log2(stride))
        if halvings > len(channels):
            raise ValueError(f"ViTConfig.hybrid_stem: stride {stride} needs at least {halvings} conv layers "
                             f"(got channels={list(channels)})")
        strides = [1] * (len(channels) - halvings) + [2] * halvings
    if (not isinstance(strides, (list, tuple)) or len(strides) != len(channels)
            or any(s not in (1, 2) for s in strides)):
        raise ValueError(f"ViTConfig.hybrid_stem['strides']: must list 1 or 2 for each of the {len(channels)} "
                         f"layers (got {strides!r})")
    if math.prod(strides) != stride:
        raise ValueError(f"ViTConfig.hybrid_stem: the layer strides {list(strides)} downsample by "
                         f"{math.prod(strides)}, not by stride={stride}")
    norm = spec.get("norm", "batch")
    if norm not in _NORMS:
        raise ValueError(f"ViTConfig.hybrid_stem['norm']: must be one of {_NORMS} (got {norm!r})")
    downsample = spec.get("downsample", "stride")
    if downsample not in _DOWNSAMPLES:
        raise ValueError(f"ViTConfig.hybrid_stem['downsample']: must be one of {_DOWNSAMPLES} (got {downsample!r})")
    return list(channels), list(strides), norm, downsample


class ConvLayer(nn.Module):
    """3x3 conv (no bias: the norm's shift replaces it) [-> 2x2 max-pool] -> BatchNorm or GroupNorm -> GELU."""

    def __init__(self, in_chans: int, out_chans: int, *, stride: int, norm: str, downsample: str = "stride") -> None:
        super().__init__()
        pool = stride == 2 and downsample == "maxpool"
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=1 if pool else stride, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = nn.BatchNorm2d(out_chans) if norm == "batch" else nn.GroupNorm(math.gcd(8, out_chans), out_chans)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.pool(self.conv(x))))


class ConvStem(nn.Module):
    """Image (B, C, H, W) -> tokens (B, N, D), N = (H / stem_stride) * (W / stem_stride)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        channels, strides, norm, downsample = _spec(config)
        self.stride = math.prod(strides)
        self.patch_size = config.patch_size
        widths = [config.in_chans] + channels
        self.stem = nn.Sequential(*(ConvLayer(widths[i], widths[i + 1], stride=s, norm=norm, downsample=downsample)
                                    for i, s in enumerate(strides)))
        self.proj = nn.Conv2d(channels[-1], config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        step = (self.stride * self.patch_size[0], self.stride * self.patch_size[1])
        if H % step[0] or W % step[1]:
            raise ValueError(f"image size {H}x{W} is not divisible by the conv stem's stride {step[0]}x{step[1]}")
        x = self.proj(self.stem(x))  # (B, D, H/s, W/s)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def build_conv_stem(config: ViTConfig) -> nn.Module:
    """The conv stem `config.hybrid_stem` describes (see the module docstring)."""
    return ConvStem(config)


# ---------------------------------------------------------------------------- named small-image models
# All at 32 px with 10 classes (CIFAR-10); override img_size / num_classes for other data.
_SMALL = dict(img_size=32, num_classes=10)

# A plain ViT for 32 px: 4x4 patches give an 8x8 grid (64 tokens + [class]), ViT-Ti-like width.
register_model("vit_cifar", "tiny", patch_size=4, embed_dim=192, depth=7, num_heads=3, mlp_dim=384, **_SMALL)
# The paper's hybrid at small scale: five conv layers (one at 32x32, two each at 16x16 and 8x8)
# make an 8x8 feature map, each position a token (1x1 patches, as in the paper's hybrids), then
# four transformer blocks. On the H100 this learned faster than three convs + six blocks at the
# same cost (88.3% vs 83.8% test in about a minute; benchmarks/RESULTS.md, runs C and A).
register_model("vit_cifar_conv", "tiny", patch_size=1, embed_dim=256, depth=4, num_heads=4, mlp_dim=512,
               hybrid_stem={"type": "conv", "stride": 4, "channels": [64, 128, 128, 256, 256],
                            "strides": [1, 2, 1, 2, 1], "norm": "batch"}, **_SMALL)
register_model("hybrid-cifar", "vit_cifar_conv")
