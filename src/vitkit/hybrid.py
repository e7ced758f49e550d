"""The paper's hybrid ViT: a BiT ResNet computes the feature map, each position becomes a token.

Dosovitskiy et al., 2021, Sec. 3.1 "Hybrid Architecture": "the patch embedding projection E is
applied to patches extracted from a CNN feature map ... the patches can have spatial size 1x1".
For R50+ViT-B/16 the ResNet-50 keeps its first three stages with 3, 4 and 9 units (the third
stage's units moved from stage 4, Appendix D.4), so the feature map has stride 16.

The ResNet is BiT's (Kolesnikov et al., 2020) as the JAX hybrids use it: weight-standardised
convolutions, GroupNorm with 32 groups, post-activation bottlenecks, TF "SAME" padding. Selected by

    ViTConfig(hybrid_stem={"type": "resnet", "layers": [3, 4, 9], "stride": 16, "width": 64},
              patch_size=1)

  layers  bottleneck units per stage; [] keeps only the root (7x7 conv + max pool, stride 4)
  stride  the backbone's total downsampling: 4 with no stages, else 4 * 2 ** (stages - 1)
  width   the root's output channels; stage i then has 4 * width * 2 ** i channels (64: ResNet-50)

Parameter names are timm's (`patch_embed.backbone.stem.conv`, `...stages.0.blocks.0.conv1`,
`patch_embed.proj`), so timm's hybrid state dicts load as they are; `npz_to_state` /
`state_to_npz` translate the JAX checkpoints' `conv_root`, `gn_root`, `block{s}/unit{u}` layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ViTConfig
from .errors import CheckpointError
from .variants import register_model

_KEYS = {"type", "layers", "stride", "width"}
# timm builds its hybrids' convs with eps 1e-8 in the weight standardisation; parity needs the same.
_WS_EPS = 1e-8
_GN_GROUPS = 32


def backbone_stride(layers: list[int]) -> int:
    """Total downsampling of a BiT backbone with these stages: root 4, then x2 per stage after the first."""
    return 4 * 2 ** max(len(layers) - 1, 0)


def _spec(config: ViTConfig) -> tuple[list[int], int]:
    """Validate `config.hybrid_stem` for a ResNet; return (layers, width). Errors name the key."""
    spec: dict[str, Any] = dict(config.hybrid_stem or {})
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ValueError(f"ViTConfig.hybrid_stem: unknown keys {unknown} for a resnet stem; known: {sorted(_KEYS)}")
    layers = spec.get("layers", [3, 4, 9])
    if not isinstance(layers, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in layers):
        raise ValueError(f"ViTConfig.hybrid_stem['layers']: must be a list of positive ints (got {layers!r})")
    width = spec.get("width", 64)
    if not isinstance(width, int) or width < _GN_GROUPS or width % _GN_GROUPS:
        raise ValueError(f"ViTConfig.hybrid_stem['width']: must be a multiple of {_GN_GROUPS} (GroupNorm's "
                         f"groups) (got {width!r})")
    expected = backbone_stride(list(layers))
    if spec.get("stride") != expected:
        raise ValueError(f"ViTConfig.hybrid_stem['stride']: a backbone with stages {list(layers)} downsamples by "
                         f"{expected} (got {spec.get('stride')!r})")
    return list(layers), width


def _pad_same(x: Tensor, kernel: int, stride: int, value: float = 0.0) -> Tensor:
    """TF's "SAME" padding: output size ceil(in / stride), the extra pixel on the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension (W) first
        # (ceil(n / s) - 1) * s + k - n reduces to k - s when s divides n, else k - n % s. Written
        # this way the pad is a plain int whenever export knows the size is a multiple of the
        # stride (HybridEmbed only accepts such images), instead of a ceil/max of a symbolic size
        # that sent torch.export's symbolic solver into minutes of sympy.
        remainder = size % stride
        total = max(kernel - stride, 0) if remainder == 0 else max(kernel - remainder, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """A convolution whose kernel is standardised per output channel before use (Qiao et al., 2019;
    BiT): with GroupNorm it trains at any batch size."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, *, stride: int = 1) -> None:
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + _WS_EPS)
        x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32), then ReLU unless `act=False` (the last norm of a unit, before the sum)."""

    def __init__(self, channels: int, *, act: bool = True) -> None:
        super().__init__(_GN_GROUPS, channels, eps=1e-5)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class MaxPoolSame(nn.Module):
    """3x3 max pool, stride 2, TF "SAME" padding with -inf so the pad never wins."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(_pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class Root(nn.Sequential):
    """BiT's root block: 7x7 conv stride 2, GroupNorm + ReLU, 3x3 max pool stride 2 (stride 4)."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_chans, width, 7, stride=2)
        self.norm = GroupNormAct(width)
        self.pool = MaxPoolSame()


class Downsample(nn.Module):
    """The projection shortcut of a stage's first unit: 1x1 conv (strided) + GroupNorm."""

    def __init__(self, in_chans: int, out_chans: int, *, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_chans, out_chans, 1, stride=stride)
        self.norm = GroupNormAct(out_chans, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """A post-activation bottleneck unit (1x1 -> 3x3 -> 1x1 at a quarter of the width), as the
    hybrids use it; the stride sits on the 3x3 conv (ResNet v1.5)."""

    def __init__(self, in_chans: int, out_chans: int, *, stride: int) -> None:
        super().__init__()
        mid = out_chans // 4
        needs_projection = stride != 1 or in_chans != out_chans
        self.downsample = Downsample(in_chans, out_chans, stride=stride) if needs_projection else None
        self.conv1 = StdConv2d(in_chans, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_chans, 1)
        self.norm3 = GroupNormAct(out_chans, act=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, *, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(
            Bottleneck(in_chans if i == 0 else out_chans, out_chans, stride=stride if i == 0 else 1)
            for i in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetBackbone(nn.Module):
    """Root block, then stages; the first stage keeps the root's stride 4, each later one halves."""

    def __init__(self, *, in_chans: int, layers: list[int], width: int) -> None:
        super().__init__()
        self.stem = Root(in_chans, width)
        channels = [4 * width * 2 ** i for i in range(len(layers))]
        ins = [width] + channels[:-1]
        self.stages = nn.Sequential(*(Stage(ins[i], channels[i], depth=n, stride=1 if i == 0 else 2)
                                      for i, n in enumerate(layers)))
        self.num_features = channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """Steps 1-2 of a hybrid: image (B, C, H, W) -> ResNet feature map -> P x P patches of it
    (usually 1 x 1) projected to width D -> tokens (B, N, D), N = (H / stem_stride) * (W / stem_stride)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        layers, width = _spec(config)
        self.stride = config.stem_stride
        # With no stages timm keeps the bare root as the backbone; the same module tree keeps its names.
        if layers:
            self.backbone: nn.Module = ResNetBackbone(in_chans=config.in_chans, layers=layers, width=width)
            features = self.backbone.num_features
        else:
            self.backbone = Root(config.in_chans, width)
            features = width
        self.proj = nn.Conv2d(features, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if H % self.stride[0] or W % self.stride[1]:
            raise ValueError(f"image size {H}x{W} is not divisible by the hybrid stem's stride "
                             f"{self.stride[0]}x{self.stride[1]}")
        x = self.proj(self.backbone(x))  # (B, D, H/s, W/s)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def build_resnet_stem(config: ViTConfig) -> nn.Module:
    """The ResNet hybrid stem `config.hybrid_stem` describes (see the module docstring)."""
    return HybridEmbed(config)


# ---------------------------------------------------------------------------- the JAX .npz layout
_NPZ_UNIT = re.compile(r"^block(\d+)/unit(\d+)/(conv\d|gn\d|conv_proj|gn_proj)/(kernel|scale|bias)$")
_NPZ_PARTS = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "gn1": "norm1", "gn2": "norm2",
              "gn3": "norm3", "conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def is_npz_stem_key(key: str, *, prefix: str = "") -> bool:
    """Whether an .npz entry belongs to the hybrid's ResNet (conv_root, gn_root, block{s}/unit{u})."""
    rest = key[len(prefix):] if key.startswith(prefix) else None
    return rest is not None and (rest.startswith(("conv_root/", "gn_root/")) or bool(_NPZ_UNIT.match(rest)))


def npz_spec(arrays: Mapping[str, np.ndarray], *, prefix: str = "") -> dict[str, Any] | None:
    """The `hybrid_stem` spec an .npz checkpoint's ResNet entries describe, or None if it has none."""
    root = arrays.get(f"{prefix}conv_root/kernel")
    if root is None:
        return None
    units: dict[int, int] = {}
    for key in arrays:
        match = _NPZ_UNIT.match(key[len(prefix):]) if key.startswith(prefix) else None
        if match:
            stage, unit = int(match.group(1)), int(match.group(2))
            units[stage] = max(units.get(stage, 0), unit)
    layers = [units[s] for s in sorted(units)]
    if sorted(units) != list(range(1, len(units) + 1)):
        raise ValueError(f"the ResNet stages in the checkpoint are not numbered 1..n: {sorted(units)}")
    return {"type": "resnet", "layers": layers, "stride": backbone_stride(layers), "width": int(root.shape[-1])}


def npz_to_state(arrays: Mapping[str, np.ndarray], *, prefix: str = "") -> dict[str, Tensor]:
    """The ResNet entries of a JAX hybrid checkpoint as vitkit's `patch_embed.backbone.*` tensors.

    Convolution kernels are HWIO in JAX and OIHW in PyTorch. Entries that are not part of the
    ResNet are left for the caller; `is_npz_stem_key` says which ones this function reads.
    """
    spec = npz_spec(arrays, prefix=prefix)
    if spec is None:
        return {}
    root = "patch_embed.backbone.stem." if spec["layers"] else "patch_embed.backbone."
    state: dict[str, Tensor] = {}
    for key, value in arrays.items():
        if not is_npz_stem_key(key, prefix=prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith(("conv_root/", "gn_root/")):
            part, leaf = rest.split("/")
            name = root + ("conv" if part == "conv_root" else "norm") + "." + _LEAF[leaf]
        else:
            match = _NPZ_UNIT.match(rest)
            stage, unit, part, leaf = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
            name = f"patch_embed.backbone.stages.{stage - 1}.blocks.{unit - 1}.{_NPZ_PARTS[part]}.{_LEAF[leaf]}"
        array = np.asarray(value)
        if leaf == "kernel":
            array = array.transpose(3, 2, 0, 1)  # (H, W, I, O) -> (O, I, H, W)
        state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return state


def state_to_npz(state: Mapping[str, Tensor], *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `npz_to_state`: vitkit's `patch_embed.backbone.*` tensors in the JAX layout."""
    parts = {v: k for k, v in _NPZ_PARTS.items()}
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        if not name.startswith("patch_embed.backbone."):
            continue
        rest = name.removeprefix("patch_embed.backbone.").removeprefix("stem.")
        module, leaf = rest.rsplit(".", 1)
        array = tensor.detach().cpu().float().numpy()
        is_conv = array.ndim == 4
        if is_conv:
            array = array.transpose(2, 3, 1, 0)  # (O, I, H, W) -> (H, W, I, O)
        jax_leaf = "kernel" if is_conv else ("scale" if leaf == "weight" else "bias")
        if module in ("conv", "norm"):
            key = ("conv_root" if module == "conv" else "gn_root") + "/" + jax_leaf
        else:
            match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", module)
            if match is None:
                raise ValueError(f"{name}: not a parameter of a BiT ResNet stem")
            key = f"block{int(match.group(1)) + 1}/unit{int(match.group(2)) + 1}/{parts[match.group(3)]}/{jax_leaf}"
        out[prefix + key] = np.ascontiguousarray(array)
    return out


# ---------------------------------------------------------------------------- converter hooks
def _stage_layers(names: list[str], pattern: str, source: str) -> list[int]:
    """Units per stage from names matching `pattern` (groups: stage, unit; numbered from 0 or 1)."""
    units: dict[int, set[int]] = {}
    for name in names:
        match = re.match(pattern, name)
        if match:
            units.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(units)
    first = stages[0] if stages else 0
    if stages != list(range(first, first + len(stages))) or any(
            sorted(u) != list(range(min(u), min(u) + len(u))) for u in units.values()):
        raise CheckpointError(source, f"the ResNet stages/units are not numbered without gaps: "
                                      f"{ {s: sorted(u) for s, u in units.items()} }")
    return [len(units[s]) for s in stages]


def _read_timm_stem(keys: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """STEM_READERS["timm"]: a timm hybrid's `patch_embed.backbone.*` keep their names here."""
    prefix = "patch_embed.backbone."
    names = [k for k in keys.tensors if k.startswith(prefix)]
    root_key = prefix + ("conv.weight" if prefix + "conv.weight" in keys else "stem.conv.weight")
    if root_key not in keys:
        raise CheckpointError(keys.source, "a hybrid whose backbone is not a BiT ResNetV2 (no "
                                           f"{prefix}stem.conv.weight); vitkit builds only those")
    layers = _stage_layers(names, r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.", keys.source)
    root = keys.tensors[root_key]  # (width, C, 7, 7)
    fields["in_chans"] = int(root.shape[1])
    for name in names:
        keys.out[name] = keys.take(name)
    return {"type": "resnet", "layers": layers, "stride": backbone_stride(layers), "width": int(root.shape[0])}


def _read_npz_stem(keys: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """STEM_READERS["npz"]: `conv_root`, `gn_root`, `block{s}/unit{u}/...` -> `patch_embed.backbone.*`."""
    root_key = next((k for k in keys.tensors if k.endswith("conv_root/kernel")), None)
    if root_key is None:
        raise CheckpointError(keys.source, "a hybrid checkpoint without conv_root/kernel")
    prefix = root_key.removesuffix("conv_root/kernel")
    arrays = {k: keys.take(k) for k in list(keys.tensors) if is_npz_stem_key(k, prefix=prefix)}
    spec = npz_spec(arrays, prefix=prefix)
    fields["in_chans"] = int(arrays[root_key].shape[2])  # HWIO
    keys.out.update(npz_to_state(arrays, prefix=prefix))
    return spec


def _register_readers() -> None:
    from .convert import STEM_READERS

    STEM_READERS.setdefault("timm", _read_timm_stem)
    STEM_READERS.setdefault("npz", _read_npz_stem)


_register_readers()


# ---------------------------------------------------------------------------- named hybrids
def _resnet(layers: list[int]) -> dict[str, Any]:
    return {"type": "resnet", "layers": layers, "stride": backbone_stride(layers), "width": 64}


# The paper's R50+ViT-B/16 (Table 5): ResNet-50 stages 3, 4, 9 (stride 16) and 1x1 patches, so
# "/16" is the pixels per token. timm's names say the backbone stride (s16, s32) and patch (p8).
register_model("R50+ViT-B/16", "ViT-B/16", patch_size=1, hybrid_stem=_resnet([3, 4, 9]))
register_model("vit_base_r50_s16_224", "R50+ViT-B/16")
register_model("vit_base_r50_s16_384", "R50+ViT-B/16", img_size=384)
register_model("R50+ViT-L/32", "ViT-L/32", patch_size=1, hybrid_stem=_resnet([3, 4, 6, 3]))
register_model("vit_large_r50_s32_224", "R50+ViT-L/32")
register_model("vit_large_r50_s32_384", "R50+ViT-L/32", img_size=384)
# AugReg's (Steiner et al., 2021) R26+S/32 and R+Ti/16 (a bare root, stride 4, then 8x8 patches).
register_model("R26+ViT-S/32", "ViT-S/32", patch_size=1, hybrid_stem=_resnet([2, 2, 2, 2]))
register_model("vit_small_r26_s32_224", "R26+ViT-S/32")
register_model("vit_small_r26_s32_384", "R26+ViT-S/32", img_size=384)
register_model("vit_base_r26_s32_224", "ViT-B/32", patch_size=1, hybrid_stem=_resnet([2, 2, 2, 2]))
register_model("R+ViT-Ti/16", "ViT-Ti/16", patch_size=8, hybrid_stem=_resnet([]))
register_model("vit_tiny_r_s16_p8_224", "R+ViT-Ti/16")
register_model("vit_tiny_r_s16_p8_384", "R+ViT-Ti/16", img_size=384)
