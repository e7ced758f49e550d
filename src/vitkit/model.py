"""The Vision Transformer, in the order of the paper's seven steps (Dosovitskiy et al., 2021, Sec. 3.1):

1. split the image into P x P patches          -> PatchEmbed (the convolution's stride)
2. project each patch linearly to width D      -> PatchEmbed.proj          (Eq. 1, E)
3. prepend a learnable [class] token           -> cls_token                (Eq. 1, x_class)
4. add learnable 1-D position embeddings       -> pos_embed                (Eq. 1, E_pos)
5. L pre-LN encoder blocks, then a final LN    -> blocks, norm             (Eq. 2, 3, 4)
6. take the [class] token's output             -> _pool                    (Eq. 4, z_L^0)
7. classify it with a head                     -> pre_logits, head
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import Preprocessing, ViTConfig
from .layers import Block, PatchEmbed


def resample_pos_embed(pos_embed: Tensor, *, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix: int, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """Resample position embeddings to another patch grid in 2-D (paper Sec. 3.2, "Fine-tuning
    and higher resolution"): the patch entries are laid out on their grid and interpolated; the
    first `num_prefix` entries (the [class] token's, ...) are kept as they are.

    pos_embed: (1, num_prefix + old_H * old_W, D). Returns (1, num_prefix + new_H * new_W, D).
    Interpolation runs in float32 whatever the input's dtype, so bf16 models resample accurately.
    """
    # Exported and traced graphs always resample (the identity at equal grids): otherwise the
    # comparison would pin the graph to the example input's resolution.
    if not (torch.compiler.is_exporting() or torch.jit.is_tracing()) and tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embeddings hold {grid.shape[1]} patch entries, not {old_grid[0]}x{old_grid[1]}")
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    align = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    anti = {"antialias": antialias} if mode in ("bicubic", "bilinear") else {}
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, **align, **anti).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # (1, N', D)
    return torch.cat([prefix, grid], dim=1)


@dataclass
class EncoderOutput:
    """Everything `forward_intermediates` can return; fields not asked for stay empty."""

    features: Tensor  # (B, T, D): all tokens after the final norm, prefix tokens first
    intermediates: dict[int, Tensor] = field(default_factory=dict)  # block index -> (B, T, D)
    attentions: dict[int, Tensor] = field(default_factory=dict)  # block index -> (B, heads, T, T)
    grid_size: tuple[int, int] = (0, 0)  # the patch grid (H/P, W/P) of this input


class VisionTransformer(nn.Module):
    """ViT as in the paper. Build it from a `ViTConfig`, or by name with `vitkit.create_model`.

    Besides the weights, a model carries what is needed to use it: `class_names` (a list of
    labels, or None) and `preprocessing` (resize, crop, mean, std), saved with its checkpoints.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        # Steps 1-2: patches and their linear embedding (or a hybrid CNN feature map, Sec. 3.1).
        self.patch_embed = _build_stem(config)
        # Step 3: prefix tokens: [class], DeiT's distillation token, registers.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if config.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if config.distill_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, D)) if config.reg_tokens else None
        # Step 4: learnable 1-D position embeddings, one per token.
        num_pos = config.num_patches + (config.num_prefix_tokens if config.prefix_pos_embed else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, D))
        self.pos_drop = nn.Dropout(config.drop_rate)
        # Step 5: the encoder; stochastic depth grows linearly with depth (Huang et al., 2016).
        drop_path = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(D, num_heads=config.num_heads, mlp_dim=config.mlp_dim, qkv_bias=config.qkv_bias,
                  qk_norm=config.qk_norm, norm_eps=config.norm_eps, init_values=config.init_values,
                  drop=config.drop_rate, attn_drop=config.attn_drop_rate, drop_path=drop_path[i])
            for i in range(config.depth)
        )
        self.norm = nn.Identity() if config.use_fc_norm else nn.LayerNorm(D, eps=config.norm_eps)
        # Steps 6-7: pooled token -> (pre-logits) -> head.
        self.fc_norm = nn.LayerNorm(D, eps=config.norm_eps) if config.use_fc_norm else nn.Identity()
        if config.representation_size:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(D, config.representation_size))
            self.pre_logits.add_module("act", nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        head_in = config.representation_size or D
        self.head = nn.Linear(head_in, config.num_classes) if config.num_classes else nn.Identity()
        self.head_dist = (nn.Linear(head_in, config.num_classes)
                          if config.distill_token and config.num_classes else None)

        self.grad_checkpointing = False
        self.class_names: list[str] | None = None
        self.preprocessing = Preprocessing.for_size(config.img_size)
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) weights, zero biases and head, as DeiT and timm do; the
        paper's JAX code also zero-initialises the head."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` classes."""
        self.config = self.config.replace(num_classes=num_classes)
        head_in = self.config.representation_size or self.config.embed_dim
        where = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)  # a bf16 model gets a bf16 head
        self.head = nn.Linear(head_in, num_classes, **where) if num_classes else nn.Identity()
        self.head_dist = (nn.Linear(head_in, num_classes, **where)
                          if self.config.distill_token and num_classes else None)
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        self.class_names = None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this model as a vitkit directory; see `vitkit.save_pretrained`."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, ~30% more time."""
        self.grad_checkpointing = enable

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    # ------------------------------------------------------------------ the forward pass
    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Steps 1-4: image (B, C, H, W) -> token sequence (B, T, D) and the patch grid."""
        config = self.config
        stride = config.stem_stride
        grid = (x.shape[-2] // stride[0], x.shape[-1] // stride[1])
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        pos_embed = resample_pos_embed(
            self.pos_embed, old_grid=config.grid_size, new_grid=grid,
            num_prefix=config.num_prefix_tokens if config.prefix_pos_embed else 0,
            mode=config.pos_embed_interpolation)
        if config.prefix_pos_embed:
            x = torch.cat(prefix + [x], dim=1) + pos_embed  # (B, T, D), T = prefix + N
        else:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        return self.pos_drop(x), grid

    def forward_intermediates(self, x: Tensor, *, indices: Iterable[int] = (),
                              attention_layers: Iterable[int] = ()) -> EncoderOutput:
        """Run the encoder, keeping the outputs of blocks `indices` and the attention
        probabilities of blocks `attention_layers` (negative indices count from the end).
        Only the layers in `attention_layers` leave the fused attention kernel."""
        depth = self.config.depth
        indices, attention_layers = list(indices), list(attention_layers)
        outside = [i for i in indices + attention_layers if not -depth <= i < depth]
        if outside:
            raise ValueError(f"block index {outside[0]} is outside this model's {depth} blocks "
                             f"(0 to {depth - 1}, or -{depth} to -1)")
        keep = {i % depth for i in indices}
        keep_attn = {i % depth for i in attention_layers}
        x, grid = self._embed(x)
        out = EncoderOutput(features=x, grid_size=grid)
        for i, block in enumerate(self.blocks):
            want_attn = i in keep_attn
            if self.grad_checkpointing and self.training and not want_attn and not torch.jit.is_scripting():
                x, attn = checkpoint(block, x, use_reentrant=False)
            else:
                x, attn = block(x, return_attention=want_attn)
            if i in keep:
                out.intermediates[i] = x
            if attn is not None:
                out.attentions[i] = attn
        out.features = self.norm(x)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """Steps 1-5: image (B, C, H, W) -> normalised tokens (B, T, D)."""
        x, _ = self._embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, _ = block(x)
        return self.norm(x)

    def _pool(self, tokens: Tensor) -> Tensor:
        """Step 6: (B, T, D) -> (B, D): the [class] token's output (Eq. 4) or the patch mean."""
        if self.config.global_pool == "avg":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return tokens[:, 0]

    def forward_head(self, tokens: Tensor, *, pre_logits: bool = False) -> Tensor:
        """Steps 6-7: tokens (B, T, D) -> logits (B, num_classes), or the pooled features."""
        x = self.pre_logits(self.fc_norm(self._pool(tokens)))
        if self.head_dist is not None:
            # DeiT: at inference the class and distillation heads vote equally (Touvron et al., Sec. 4);
            # the features their vote reads are the mean of the two tokens' (as timm returns them).
            dist = self.pre_logits(self.fc_norm(tokens[:, 1]))
            return (x + dist) / 2 if pre_logits else (self.head(x) + self.head_dist(dist)) / 2
        if pre_logits:
            return x
        return self.head(x)

    def forward_distilled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """DeiT training: the class head's and the distillation head's logits, separately."""
        if self.head_dist is None:
            raise ValueError("forward_distilled needs a model built with distill_token=True")
        tokens = self.forward_features(x)
        cls_out = self.pre_logits(self.fc_norm(tokens[:, 0]))
        dist_out = self.pre_logits(self.fc_norm(tokens[:, 1]))
        return self.head(cls_out), self.head_dist(dist_out)

    def forward(self, x: Tensor) -> Tensor:
        """Image batch (B, C, H, W), normalised as `self.preprocessing` says -> logits (B, K).
        Softmax of the logits gives class probabilities."""
        return self.forward_head(self.forward_features(x))


def _build_stem(config: ViTConfig) -> nn.Module:
    """Steps 1-2 for a plain ViT; a hybrid's CNN stem (only hybrid models import the CNN code)."""
    if not config.hybrid_stem:
        return PatchEmbed(patch_size=config.patch_size, in_chans=config.in_chans, embed_dim=config.embed_dim)
    kind = config.hybrid_stem.get("type")
    if kind == "resnet":  # the paper's BiT ResNet hybrid (R50+ViT-B/16)
        from .hybrid import build_resnet_stem

        return build_resnet_stem(config)
    if kind == "conv":  # a few strided 3x3 convolutions for small images
        from .conv_stem import build_conv_stem

        return build_conv_stem(config)
    raise ValueError(f"ViTConfig.hybrid_stem: unknown type {kind!r}; expected 'resnet' or 'conv'")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level component, in the paper's order, plus 'total'."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        component = name.split(".")[0]
        counts[component] = counts.get(component, 0) + param.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def count_flops(config: ViTConfig, *, img_size: Sequence[int] | None = None) -> dict[str, int]:
    """Forward FLOPs per image (a multiply-add counts 2), by component, plus 'total'.

    Counts matrix products (patch projection, qkv, attention scores and weighted sum, output
    projection, MLP, head); norms, softmax and GELU are a fraction of a percent and left out.
    A hybrid's CNN stem is counted by running it on shapes only (the meta device), its
    convolutions included, under 'patch_embed'.
    """
    H, W = img_size if img_size is not None else config.img_size
    stride = config.stem_stride
    N = (H // stride[0]) * (W // stride[1])
    T = N + config.num_prefix_tokens
    D = config.embed_dim
    patch_in = config.in_chans * config.patch_size[0] * config.patch_size[1]
    per_block_linear = 2 * T * (D * 3 * D + D * D + 2 * D * config.mlp_dim)
    per_block_attention = 2 * 2 * T * T * D  # q k^T and attn v, across all heads
    head_in = config.representation_size or D
    flops = {
        "patch_embed": 2 * N * patch_in * D,
        "blocks": config.depth * (per_block_linear + per_block_attention),
        "pre_logits": 2 * D * config.representation_size if config.representation_size else 0,
        "head": 2 * head_in * config.num_classes * (2 if config.distill_token else 1),
    }
    if config.hybrid_stem:
        flops["patch_embed"] = _stem_flops(config, (H, W))
    flops["total"] = sum(flops.values())
    return flops


def _stem_flops(config: ViTConfig, size: tuple[int, int]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        stem = _build_stem(config)
        image = torch.empty(1, config.in_chans, *size)
    with FlopCounterMode(display=False) as counter:
        stem(image)
    return int(counter.get_total_flops())


__all__ = ["VisionTransformer", "EncoderOutput", "resample_pos_embed", "count_parameters", "count_flops"]
