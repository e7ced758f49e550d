"""`vitkit info`: what a model is, in the paper's terms, and what it costs."""

from __future__ import annotations

from .model import VisionTransformer, count_flops, count_parameters
from .variants import paper_name


def describe(model: VisionTransformer) -> str:
    """A human-readable summary: architecture, parameters and forward FLOPs by component."""
    c = model.config
    params = count_parameters(model)
    flops = count_flops(c)
    name = paper_name(c) or "custom ViT"
    lines = [
        f"{name}: {_millions(params['total'])} parameters, {flops['total'] / 1e9:.3g} GFLOPs per image "
        f"at {c.img_size[0]}x{c.img_size[1]}",
        f"  patches      {_patches(c)} -> grid {c.grid_size[0]}x{c.grid_size[1]} = {c.num_patches} patches",
        f"  tokens       {c.num_patches + c.num_prefix_tokens} ({c.num_prefix_tokens} prefix: "
        f"class={int(c.class_token)}, distill={int(c.distill_token)}, registers={c.reg_tokens})",
        f"  width D      {c.embed_dim}",
        f"  depth L      {c.depth}",
        f"  heads        {c.num_heads} x {c.head_dim}",
        f"  MLP size     {c.mlp_dim}",
        f"  pooling      {_pooling(c)}",
        f"  classes      {c.num_classes}" + (f" ({', '.join(model.class_names[:5])}{', ...' if len(model.class_names) > 5 else ''})"
                                            if model.class_names else ""),
        "",
        f"  {'component':<14}{'parameters':>14}{'GFLOPs':>10}",
    ]
    for component, count in params.items():
        if component == "total":
            continue
        lines.append(f"  {component:<14}{count:>14,}{flops.get(component, 0) / 1e9:>10.3f}")
    lines.append(f"  {'total':<14}{params['total']:>14,}{flops['total'] / 1e9:>10.3f}")
    return "\n".join(lines)


def _patches(c) -> str:
    """The pixels each token covers; a hybrid's stem reduces them first (R50: 16 px, 1x1 patches)."""
    pixels = f"{c.stem_stride[0]}x{c.stem_stride[1]} px"
    if c.hybrid_stem:
        return f"{pixels} (a {c.patch_size[0]}x{c.patch_size[1]} patch of the stem's feature map)"
    return pixels


def _pooling(c) -> str:
    if c.global_pool != "token":
        return "mean of patch tokens"
    # DeiT's distilled models average the heads on the [class] and [dist] tokens at inference.
    return "[class] and [dist] tokens (mean of two heads)" if c.distill_token else "[class] token"


def _millions(count: int) -> str:
    """86.6M, 5.7M; small models keep their digits (0.024M, not 0.0M)."""
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e6:.2g}M"
