"""timm state dicts: vitkit's parameter names are timm's, so the work is inferring the architecture.

A timm file holds only tensors. Their shapes say width, depth, patch size, channels, MLP size,
classes, prefix tokens, qkv bias, qk-norm, LayerScale, fc_norm and pre-logits; they cannot say
the number of heads (a fused qkv is (3D, D) for any head count), and a non-square image size is
not recoverable from the position-embedding length. For those the caller names the model.

timm's Hub repositories (`hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`) hold such a
file beside a config.json that names the architecture and the preprocessing: `read_timm_hub_dir`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Preprocessing, ViTConfig
from ..errors import CheckpointError, VitkitError, first_line
from ..variants import heads_for_width, resolve
from ..weights import atomic_write
from . import (STEM_READERS, UNRECORDED_NORM_EPS, KeyTracker, block_count, patch_fields, refuse, square_grid,
               warn_unrecorded_eps)

# Keys of timm models that vitkit does not build, with the reason given to the user.
_UNSUPPORTED_PREFIXES = {
    "attn_pool.": "a MAP (attention-pooling) head",
    "norm_pre.": "a pre-norm before the encoder (CLIP-style)",
    "patch_embed.norm.": "a norm inside the patch embedding",
}


def read_timm_state_dict(state: dict[str, Tensor], *, base: ViTConfig | None, source: str
                         ) -> tuple[ViTConfig, dict[str, Tensor], dict[str, Any]]:
    """Infer the ViTConfig of a timm VisionTransformer state dict from its tensor shapes.

    base: the named model (`load_pretrained(..., model=...)`), which supplies the head count,
    a non-square img_size and the LayerNorm eps; its shape fields must agree with the file.
    Returns (config, state dict with vitkit names, extras={}). Raises CheckpointError naming
    `source` for anything that is not a ViT state dict or does not fit `base`."""
    for prefix, what in _UNSUPPORTED_PREFIXES.items():
        if any(k.startswith(prefix) for k in state):
            raise CheckpointError(source, f"{what} ({prefix}*) is not supported by vitkit")
    if "patch_embed.proj.weight" not in state and not any(k.startswith("patch_embed.backbone.") for k in state):
        shown = sorted(state)[:6]
        raise CheckpointError(source, f"not a timm ViT state dict: no 'patch_embed.proj.weight' (keys start {shown})")
    keys = KeyTracker(dict(state), source=source)
    fields: dict[str, Any] = {}
    if keys.has_prefix("patch_embed.backbone."):
        fields["hybrid_stem"] = _read_stem(keys, fields)
    stem_keys = set(keys.used)  # renamed by the stem reader into keys.out
    D = patch_fields(keys.take("patch_embed.proj.weight"), fields, key="patch_embed.proj.weight", source=source)
    try:
        depth = block_count(state, "blocks.")
    except ValueError as error:
        raise CheckpointError(source, str(error)) from None
    if depth == 0:
        raise CheckpointError(source, "no encoder blocks (blocks.0.*)")
    fields["depth"] = depth
    fields["mlp_dim"] = keys.take("blocks.0.mlp.fc1.weight").shape[0]
    fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in keys
    fields["qk_norm"] = "blocks.0.attn.q_norm.weight" in keys
    fields["init_values"] = 1e-5 if "blocks.0.ls1.gamma" in keys else None  # any value: the file holds gamma
    fields["class_token"] = "cls_token" in keys
    fields["distill_token"] = "dist_token" in keys
    fields["reg_tokens"] = keys.take("reg_token").shape[1] if "reg_token" in keys else 0
    has_fc_norm = "fc_norm.weight" in keys
    if has_fc_norm or not fields["class_token"]:
        fields["global_pool"], fields["fc_norm"] = "avg", has_fc_norm
    else:
        # A class token without fc_norm is timm's default, token pooling; averaging with a plain
        # final norm leaves the same tensors, so only the named model can say it.
        fields["global_pool"] = base.global_pool if base else "token"
        fields["fc_norm"] = base.fc_norm if base else None
    fields["representation_size"] = keys.take("pre_logits.fc.weight").shape[0] if "pre_logits.fc.weight" in keys else None
    fields["num_classes"] = keys.take("head.weight").shape[0] if "head.weight" in keys else 0
    fields["num_heads"] = _num_heads(D, base, source)
    fields["norm_eps"] = base.norm_eps if base else UNRECORDED_NORM_EPS
    fields.update(_img_size(keys, fields, base, source))
    if base is not None:
        _check_against_base(fields, base, source)
    try:
        config = ViTConfig(**fields)
    except ValueError as error:
        raise CheckpointError(source, str(error)) from None
    # Every other key goes to the model as it is: load_state names any that do not fit.
    return config, {**{k: v for k, v in state.items() if k not in stem_keys}, **keys.out}, {}


# timm's model_args (recorded in a Hub config.json) that are ViTConfig fields of the same meaning;
# those that change only training, or inputs of other sizes (which vitkit resamples anyway).
_SAME_ARGS = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
              "qkv_bias", "qk_norm", "init_values", "class_token", "reg_tokens", "fc_norm", "drop_rate",
              "attn_drop_rate", "drop_path_rate"}
_INERT_ARGS = {"dynamic_img_size", "dynamic_img_pad", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
               "weight_init"}
_CROP_MODES = {"center": "shorter", "squash": "stretch"}  # timm's eval transforms, in vitkit's resize modes


def read_timm_hub_dir(path: Path, meta: dict[str, Any], *, base: ViTConfig | None
                      ) -> tuple[ViTConfig, dict[str, Tensor], dict[str, Any]]:
    """A timm model directory as timm's `push_to_hf_hub` writes it (the Hub's timm/* repositories):
    config.json {"architecture", "pretrained_cfg", ...} beside model.safetensors or pytorch_model.bin.
    The architecture's name supplies what the tensors cannot say (heads, pooling, image size)
    unless the caller names the model; pretrained_cfg gives the preprocessing, label_names the classes."""
    from .hf import read_weights

    config_file = Path(path) / "config.json"
    try:
        if base is None:
            base = _named_base(meta)
        pre = meta["pretrained_cfg"]
        size = tuple(int(n) for n in pre.get("input_size", (3, 224, 224))[1:])
        crop_pct = float(pre.get("crop_pct", 0.875))
        preprocessing = Preprocessing(
            # timm's eval transform: resize to floor(size / crop_pct), centre crop to size
            resize=math.floor(min(size) / crop_pct), crop=size, interpolation=pre.get("interpolation", "bicubic"),
            mean=tuple(pre.get("mean", (0.485, 0.456, 0.406))), std=tuple(pre.get("std", (0.229, 0.224, 0.225))),
            # "border" (a pad around the crop) is rare; the centre crop comes closest
            resize_mode=_CROP_MODES.get(pre.get("crop_mode", "center"), "shorter"))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(config_file, f"not a usable timm config ({first_line(error)})") from None
    config, state, _ = read_timm_state_dict(read_weights(Path(path)), base=base, source=str(path))
    labels = meta.get("label_names")
    if isinstance(labels, dict):  # {index: name}, as timm writes it when some indices have none
        labels = [labels.get(str(i)) for i in range(config.num_classes)]
    names = labels if isinstance(labels, list) and len(labels) == config.num_classes and all(
        isinstance(n, str) for n in labels) else None
    return config, state, {"class_names": names or None, "preprocessing": preprocessing}


def _named_base(meta: dict[str, Any]) -> ViTConfig | None:
    """The model config.json's architecture names, with its recorded model_args and pooling; None
    for an architecture vitkit has no name for (the tensors and the width table then say it)."""
    try:
        named = resolve(str(meta["architecture"]))
    except ValueError:
        return None
    args = dict(meta.get("model_args") or {})
    unknown = sorted(set(args) - _SAME_ARGS - _INERT_ARGS - {"mlp_ratio", "no_embed_class"})
    if unknown:
        raise ValueError(f"model_args {unknown} that vitkit does not build")
    changes = {k: v for k, v in args.items() if k in _SAME_ARGS}
    if "mlp_ratio" in args or "embed_dim" in args:  # timm sizes the MLP by a ratio to the width
        ratio = args.get("mlp_ratio", named.mlp_dim / named.embed_dim)
        changes["mlp_dim"] = int(changes.get("embed_dim", named.embed_dim) * ratio)
    if "no_embed_class" in args:
        changes["prefix_pos_embed"] = not args["no_embed_class"]
    if meta.get("global_pool") in ("token", "avg"):
        changes["global_pool"] = meta["global_pool"]
    if changes.get("class_token") is False and changes.get("global_pool", "token") == "token":
        changes["global_pool"] = "avg"
    size = (meta.get("pretrained_cfg") or {}).get("input_size")
    if size and "img_size" not in changes:
        changes["img_size"] = tuple(size[1:])
    return named.replace(**changes)


def _read_stem(keys: KeyTracker, fields: dict[str, Any]) -> dict[str, Any]:
    if "timm" not in STEM_READERS:
        try:
            from .. import hybrid  # noqa: F401  (registers the hybrid readers)
        except ImportError:
            pass
    reader = STEM_READERS.get("timm")
    if reader is None:
        raise CheckpointError(keys.source, "a hybrid (CNN-stem) timm checkpoint, and no hybrid reader is available")
    return reader(keys, fields)


def _num_heads(width: int, base: ViTConfig | None, source: str) -> int:
    if base is not None:
        return base.num_heads
    heads = heads_for_width(width)
    if heads is None:
        raise CheckpointError(source, f"a timm state dict does not record the number of heads, and width {width} "
                                      "is not a standard one; name the model, e.g. model='vit_tiny_patch16_224' "
                                      "(on the command line --model NAME; explain's --arch NAME)")
    return heads


def _img_size(keys: KeyTracker, fields: dict[str, Any], base: ViTConfig | None, source: str) -> dict[str, Any]:
    """img_size and prefix_pos_embed from the position-embedding length (square grids only)."""
    pos = keys.take("pos_embed")  # (1, L, D)
    length = pos.shape[1]
    prefix = int(fields["class_token"]) + int(fields["distill_token"]) + fields["reg_tokens"]
    stride = (fields["patch_size"][0] * _stem_factor(fields), fields["patch_size"][1] * _stem_factor(fields))
    if base is not None:
        grid = (base.img_size[0] // stride[0], base.img_size[1] // stride[1])
        n = grid[0] * grid[1]
        if length in (n, n + prefix) and n > 0:
            return {"img_size": base.img_size, "prefix_pos_embed": length == n + prefix or prefix == 0}
    with_prefix = square_grid(length - prefix) if length > prefix else None
    without = square_grid(length) if prefix else None
    if with_prefix and without:
        raise CheckpointError(source, f"pos_embed of length {length} fits both a {with_prefix}x{with_prefix} grid "
                                      f"with prefix entries and a {without}x{without} grid without; name the model "
                                      "with its img_size (model=ViTConfig(...))")
    side, prefix_pos = (with_prefix, True) if with_prefix else (without, False)
    if side is None:
        raise CheckpointError(source, f"pos_embed holds {length} entries ({prefix} prefix tokens), not a square grid; "
                                      "name the model with its img_size (model=ViTConfig(img_size=(H, W), ...))")
    return {"img_size": (side * stride[0], side * stride[1]), "prefix_pos_embed": prefix_pos}


def _stem_factor(fields: dict[str, Any]) -> int:
    stem = fields.get("hybrid_stem")
    return int(stem.get("stride", 1)) if stem else 1


def _check_against_base(fields: dict[str, Any], base: ViTConfig, source: str) -> None:
    where = {"embed_dim": "patch_embed.proj.weight", "patch_size": "patch_embed.proj.weight",
             "in_chans": "patch_embed.proj.weight", "depth": "blocks.*", "mlp_dim": "blocks.0.mlp.fc1.weight"}
    wrong = [f"{key} ({name}: file {fields[name]!r} vs named model {getattr(base, name)!r})"
             for name, key in where.items() if name in fields and tuple(_pair(fields[name])) != tuple(_pair(getattr(base, name)))]
    if wrong:
        raise CheckpointError(source, "shapes that do not fit the named model: " + "; ".join(wrong))


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def timm_kwargs(config: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for `timm.models.vision_transformer.VisionTransformer` (or
    `timm.create_model(name, **kwargs)`) that build the model `config` describes."""
    refuse(config, target="timm", unsupported={
        "pre-logits layer (representation_size)": bool(config.representation_size),
        "hybrid stem (load it into timm's hybrid model of the same name)": bool(config.hybrid_stem),
        "distillation token (load it into timm's deit_*_distilled model)": config.distill_token,
    })
    kwargs = dict(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                  num_classes=config.num_classes, global_pool=config.global_pool, embed_dim=config.embed_dim,
                  depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.embed_dim,
                  qkv_bias=config.qkv_bias, qk_norm=config.qk_norm, init_values=config.init_values,
                  class_token=config.class_token, no_embed_class=not config.prefix_pos_embed,
                  reg_tokens=config.reg_tokens, fc_norm=config.use_fc_norm)
    if config.norm_eps != UNRECORDED_NORM_EPS:  # HF's models use 1e-12
        from functools import partial

        from torch import nn

        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=config.norm_eps)
    return kwargs


def write_timm_state_dict(model: Any, *, path: str | Path) -> Path:
    """Write `model`'s weights under timm's names: .safetensors, or a PyTorch file (.pth, .bin).
    Load it into the timm model `timm_kwargs(model.config)` builds, or for a ResNet hybrid or a
    distilled DeiT into timm's model of the same name (`vit_base_r50_s16_384`,
    `deit_base_distilled_patch16_224`). Refuses what no timm model has."""
    config = model.config
    refuse(config, target="timm", unsupported={
        "pre-logits layer (representation_size)": bool(config.representation_size),
        "convolutional stem (timm's hybrids are ResNets)": bool(config.hybrid_stem)
        and config.hybrid_stem.get("type") != "resnet",
    })
    path = Path(path)
    import warnings

    warn_unrecorded_eps(config, path, layout="timm weights file",
                        hint=" unless the model is built with timm_kwargs(config)")
    if config.class_token and config.use_fc_norm != (config.global_pool == "avg"):
        # Readers take fc_norm for average pooling (timm's default pairing); this model pairs them otherwise.
        warnings.warn(f"{path}: this model pools with {config.global_pool!r} {'with' if config.use_fc_norm else 'without'} "
                      f"fc_norm, which a timm weights file cannot say: it reads back as "
                      f"{'average' if config.use_fc_norm else 'token'} pooling unless the model is built with "
                      "timm_kwargs(config)", stacklevel=2)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    elif suffix in (".pth", ".pt", ".bin"):
        import torch

        atomic_write(path, lambda tmp: torch.save(state, tmp))
    else:
        raise VitkitError(f"{path}: a timm state dict is written as .safetensors, .pth or .bin, not {suffix!r}")
    return path
