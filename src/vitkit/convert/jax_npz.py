"""JAX `.npz` checkpoints: the paper's google-research/vision_transformer layout and big_vision's.

  original    Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
              MlpBlock_3}/..., Transformer/posembed_input/pos_embedding (with the [class] entry),
              optionally under `opt/target/` (a training checkpoint, whose optimizer state is skipped)
  big_vision  under `params/`; pos_embedding at the top, without a [class] entry; blocks named
              {LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}, either numbered
              or stacked by `nn.scan` as Transformer/encoderblock/... with a leading depth axis

Flax stores Dense kernels as (in, out), convolutions as HWIO, q/k/v kernels as (D, heads, Dh) and
the output kernel as (heads, Dh, D); LayerNorm eps is 1e-6. The architecture is read off the shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ViTConfig
from ..errors import CheckpointError
from ..weights import atomic_write, read_npz
from . import (STEM_READERS, UNRECORDED_NORM_EPS, KeyTracker, block_count, patch_fields, refuse, square_grid,
               warn_unrecorded_eps)

_PREFIXES = ("opt/target/", "params/", "")
# Sub-module names of an encoder block: (norm1, attention, norm2, mlp) per layout.
_ORIGINAL = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
_BIG_VISION = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


def read_npz_checkpoint(path: str | Path, *, base: ViTConfig | None = None
                        ) -> tuple[ViTConfig, dict[str, Tensor], dict[str, Any]]:
    """Read a JAX ViT `.npz` (either layout) into (config, vitkit state dict, extras={}).

    base: optional named model, only consulted for a non-square img_size the file cannot say.
    Raises CheckpointError naming the file and the keys for anything that does not fit."""
    path = Path(path)
    arrays = read_npz(path)
    source = str(path)
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        shown = sorted(arrays)[:6]
        raise CheckpointError(path, f"not a JAX ViT checkpoint: no embedding/kernel (keys start {shown})")
    if any(k.startswith(f"{prefix}MAPHead_0/") for k in arrays):
        raise CheckpointError(path, "a MAP (attention-pooling) head (MAPHead_0/*) is not supported by vitkit")
    keys = KeyTracker({k: v for k, v in arrays.items()}, source=source)
    if prefix == "opt/target/":
        keys.ignore("opt/state")  # the optimizer's moments: not part of the model
    fields: dict[str, Any] = {"norm_eps": UNRECORDED_NORM_EPS}
    if f"{prefix}conv_root/kernel" in arrays:
        if "npz" not in STEM_READERS:
            raise CheckpointError(path, "a hybrid (ResNet-stem) checkpoint, and no hybrid reader is available")
        fields["hybrid_stem"] = STEM_READERS["npz"](keys, fields)
    out = keys.out
    p = prefix

    def take(key: str, index: int | None = None) -> np.ndarray:
        value = np.asarray(keys.take(p + key))
        return value[index] if index is not None else value

    def tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    kernel = take("embedding/kernel")  # (P, Q, C, D), HWIO
    conv = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel  # (D, C, P, Q)
    D = patch_fields(conv, fields, key=f"{p}embedding/kernel", source=source)
    out["patch_embed.proj.weight"] = tensor(conv)
    out["patch_embed.proj.bias"] = tensor(take("embedding/bias"))

    stacked = f"{p}Transformer/encoderblock/LayerNorm_0/scale" in arrays
    if stacked:
        depth = arrays[f"{p}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        block_at = lambda i: ("Transformer/encoderblock/", i)  # noqa: E731
    else:
        try:
            depth = block_count(arrays, f"{p}Transformer/encoderblock_")
        except ValueError as error:
            raise CheckpointError(path, str(error)) from None
        block_at = lambda i: (f"Transformer/encoderblock_{i}/", None)  # noqa: E731
    if depth == 0:
        raise CheckpointError(path, "no encoder blocks (Transformer/encoderblock_0/* or Transformer/encoderblock/*)")
    first = block_at(0)[0]
    names = _ORIGINAL if f"{p}{first}{_ORIGINAL[1]}/query/kernel" in arrays else _BIG_VISION
    ln1, mha, ln2, mlp = names
    query = take(f"{first}{mha}/query/kernel", block_at(0)[1])  # (D, H, Dh)
    if query.ndim != 3:
        raise CheckpointError(path, f"{p}{first}{mha}/query/kernel has shape {query.shape}, expected (D, heads, Dh)")
    fields.update(depth=depth, num_heads=query.shape[1], qkv_bias=f"{p}{first}{mha}/query/bias" in arrays,
                  mlp_dim=np.asarray(arrays[f"{p}{first}{mlp}/Dense_0/kernel"]).shape[-1]
                  if f"{p}{first}{mlp}/Dense_0/kernel" in arrays else 0)
    for i in range(depth):
        b, idx = block_at(i)
        ours = f"blocks.{i}."
        for src, dst in ((ln1, "norm1"), (ln2, "norm2")):
            out[f"{ours}{dst}.weight"] = tensor(take(f"{b}{src}/scale", idx))
            out[f"{ours}{dst}.bias"] = tensor(take(f"{b}{src}/bias", idx))
        qkv = [take(f"{b}{mha}/{n}/kernel", idx) for n in ("query", "key", "value")]  # each (D, H, Dh)
        out[f"{ours}attn.qkv.weight"] = tensor(np.concatenate([k.reshape(D, -1).T for k in qkv]))  # (3D, D)
        if fields["qkv_bias"]:
            out[f"{ours}attn.qkv.bias"] = tensor(np.concatenate(
                [take(f"{b}{mha}/{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")]))
        out[f"{ours}attn.proj.weight"] = tensor(take(f"{b}{mha}/out/kernel", idx).reshape(-1, D).T)  # (H*Dh, D) -> (D, D)
        out[f"{ours}attn.proj.bias"] = tensor(take(f"{b}{mha}/out/bias", idx))
        for j in (0, 1):
            out[f"{ours}mlp.fc{j + 1}.weight"] = tensor(take(f"{b}{mlp}/Dense_{j}/kernel", idx).T)
            out[f"{ours}mlp.fc{j + 1}.bias"] = tensor(take(f"{b}{mlp}/Dense_{j}/bias", idx))
    out["norm.weight"] = tensor(take("Transformer/encoder_norm/scale"))
    out["norm.bias"] = tensor(take("Transformer/encoder_norm/bias"))

    fields["class_token"] = f"{p}cls" in arrays
    if fields["class_token"]:
        out["cls_token"] = tensor(take("cls").reshape(1, 1, D))
    else:
        # The paper's 'gap' classifier and big_vision's: the final norm, then the mean of the tokens.
        fields.update(global_pool="avg", fc_norm=False)
    pos_key = "pos_embedding" if f"{p}pos_embedding" in arrays else "Transformer/posembed_input/pos_embedding"
    pos = take(pos_key).reshape(1, -1, D)  # (1, L, D)
    fields.update(_grid(pos.shape[1], fields, base, path, big_vision=pos_key == "pos_embedding"))
    out["pos_embed"] = tensor(pos)
    if f"{p}pre_logits/kernel" in arrays:
        fields["representation_size"] = arrays[f"{p}pre_logits/kernel"].shape[1]
        out["pre_logits.fc.weight"] = tensor(take("pre_logits/kernel").T)
        out["pre_logits.fc.bias"] = tensor(take("pre_logits/bias"))
    fields["num_classes"] = 0
    if f"{p}head/kernel" in arrays:
        fields["num_classes"] = arrays[f"{p}head/kernel"].shape[1]
        out["head.weight"] = tensor(take("head/kernel").T)
        out["head.bias"] = tensor(take("head/bias"))
    state = keys.finish()
    try:
        config = ViTConfig(**fields)
    except ValueError as error:
        raise CheckpointError(path, str(error)) from None
    return config, state, {}


def _grid(length: int, fields: dict[str, Any], base: ViTConfig | None, path: Path, *, big_vision: bool
          ) -> dict[str, Any]:
    """img_size from the position-embedding length. The layout says whether it holds a [class]
    entry: the original does (with a class token), big_vision never (it adds positions to the
    patches before prepending the token)."""
    prefix_pos = fields["class_token"] and not big_vision
    patches = length - int(prefix_pos)
    factor = int(fields["hybrid_stem"].get("stride", 1)) if fields.get("hybrid_stem") else 1
    stride = (fields["patch_size"][0] * factor, fields["patch_size"][1] * factor)
    if base is not None and (base.img_size[0] // stride[0]) * (base.img_size[1] // stride[1]) == patches:
        return {"img_size": base.img_size, "prefix_pos_embed": prefix_pos or not fields["class_token"]}
    side = square_grid(patches)
    if side is None:
        raise CheckpointError(path, f"the position embedding holds {patches} patch entries, not a square grid; "
                                    "name the model with its img_size (model=ViTConfig(img_size=(H, W), ...))")
    return {"img_size": (side * stride[0], side * stride[1]), "prefix_pos_embed": prefix_pos or not fields["class_token"]}


def write_npz(model: Any, *, path: str | Path) -> Path:
    """Write `model` as an `.npz` in the original google-research/vision_transformer layout, which
    that repository and timm's `_load_weights` read. Models without qkv biases get zero biases
    (the same function: the layout always has them). Refuses what the layout cannot express."""
    c = model.config
    refuse(c, target="JAX .npz", unsupported={
        "register tokens": c.reg_tokens > 0, "qk-norm": c.qk_norm, "LayerScale": c.init_values is not None,
        "fc_norm": c.use_fc_norm, "distillation token": c.distill_token,
        "average pooling with a [class] token": c.class_token and c.global_pool == "avg",
        "[class] token without a position embedding": c.class_token and not c.prefix_pos_embed,
        "convolutional stem (only the ResNet hybrid has a JAX layout)":
            bool(c.hybrid_stem) and c.hybrid_stem.get("type") != "resnet",
    })
    warn_unrecorded_eps(c, Path(path), layout="JAX .npz")
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    D, H = c.embed_dim, c.num_heads
    arrays: dict[str, np.ndarray] = {}
    if c.hybrid_stem:
        from ..hybrid import state_to_npz

        arrays.update(state_to_npz(model.state_dict()))
    arrays["embedding/kernel"] = sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)  # (P, Q, C, D)
    arrays["embedding/bias"] = sd["patch_embed.proj.bias"]
    if c.class_token:
        arrays["cls"] = sd["cls_token"]
    arrays["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    for i in range(c.depth):
        b, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        ln1, mha, ln2, mlp = _ORIGINAL
        for dst, src in ((ln1, "norm1"), (ln2, "norm2")):
            arrays[f"{b}{dst}/scale"] = sd[f"{ours}{src}.weight"]
            arrays[f"{b}{dst}/bias"] = sd[f"{ours}{src}.bias"]
        weight = sd[f"{ours}attn.qkv.weight"]  # (3D, D)
        bias = sd.get(f"{ours}attn.qkv.bias", np.zeros(3 * D, dtype=np.float32))
        for j, name in enumerate(("query", "key", "value")):
            arrays[f"{b}{mha}/{name}/kernel"] = weight[j * D:(j + 1) * D].T.reshape(D, H, D // H)  # (D, H, Dh)
            arrays[f"{b}{mha}/{name}/bias"] = bias[j * D:(j + 1) * D].reshape(H, D // H)
        arrays[f"{b}{mha}/out/kernel"] = sd[f"{ours}attn.proj.weight"].T.reshape(H, D // H, D)  # (H, Dh, D)
        arrays[f"{b}{mha}/out/bias"] = sd[f"{ours}attn.proj.bias"]
        for j in (0, 1):
            arrays[f"{b}{mlp}/Dense_{j}/kernel"] = sd[f"{ours}mlp.fc{j + 1}.weight"].T
            arrays[f"{b}{mlp}/Dense_{j}/bias"] = sd[f"{ours}mlp.fc{j + 1}.bias"]
    arrays["Transformer/encoder_norm/scale"] = sd["norm.weight"]
    arrays["Transformer/encoder_norm/bias"] = sd["norm.bias"]
    if c.representation_size:
        arrays["pre_logits/kernel"] = sd["pre_logits.fc.weight"].T
        arrays["pre_logits/bias"] = sd["pre_logits.fc.bias"]
    if c.num_classes:
        arrays["head/kernel"] = sd["head.weight"].T
        arrays["head/bias"] = sd["head.bias"]
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to a bare name
            np.savez(handle, **arrays)

    atomic_write(path, write)
    return path


__all__ = ["read_npz_checkpoint", "write_npz"]
