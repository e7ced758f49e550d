"""HuggingFace transformers ViT and DeiT directories, and `hf-hub:ORG/NAME` through huggingface_hub.

HF splits the fused qkv into query/key/value and names layers its own way; the architecture is
in config.json. Two spellings of the weights exist: the one on the Hub
(`encoder.layer.{i}.attention.attention.query`) and transformers 5's in-memory one
(`layers.{i}.attention.q_proj`); both are read, the Hub's is written.
HF ViT has a [class] token and token pooling only: no registers, average pooling, qk-norm or
LayerScale, so the writer refuses those. Its LayerNorm eps defaults to 1e-12 (vitkit's to 1e-6).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Preprocessing, ViTConfig
from ..errors import CheckpointError, first_line
from ..weights import atomic_write, read_state_dict
from . import KeyTracker, as_float, block_count, refuse

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*.safetensors", "pytorch_model.bin"]
# Per-layer names: vitkit -> (Hub spelling, transformers-5 spelling), under `{layer}.`.
_LAYER = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_QKV = {"q": ("attention.attention.query", "attention.q_proj"), "k": ("attention.attention.key", "attention.k_proj"),
        "v": ("attention.attention.value", "attention.v_proj")}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as HF image processors store them
# config.json keys that do not change the weights or the forward pass at inference.
_INERT = {"architectures", "transformers_version", "torch_dtype", "dtype", "hidden_dropout_prob",
          "attention_probs_dropout_prob", "initializer_range", "encoder_stride", "label2id", "_name_or_path",
          "problem_type", "output_hidden_states", "output_attentions", "return_dict", "use_mask_token",
          # transformers' generic PretrainedConfig fields, written by some versions for every model
          "torchscript", "tie_word_embeddings", "finetuning_task", "chunk_size_feed_forward", "is_encoder_decoder",
          "is_decoder", "add_cross_attention", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id",
          "eos_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params", "use_bfloat16",
          "tf_legacy_loss", "num_labels", "pruned_heads", "cross_attention_hidden_size"}


def download_hf_hub(repo_id: str) -> Path:
    """Fetch a HuggingFace Hub repository's config and weights into the HF cache, or find them
    there when offline (HF_HUB_OFFLINE=1); HF_HUB_CACHE chooses the cache. Returns the snapshot
    directory. Raises CheckpointError naming `hf-hub:{repo_id}` when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    source = f"hf-hub:{repo_id}"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError(source, "expected hf-hub:ORG/NAME")
    # Read at call time: huggingface_hub reads these once, when it is first imported.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        # Many repositories hold both weight files: the .bin is fetched only when no safetensors
        # came. Asking the Hub for a file listing first would cost, with no network, ~23 s of
        # retries before snapshot_download falls back to the cache.
        path = Path(snapshot_download(repo_id, allow_patterns=[p for p in _HUB_FILES if not p.endswith(".bin")],
                                      local_files_only=offline, cache_dir=cache_dir))
        if not any(path.glob("*.safetensors")) and not (path / "pytorch_model.bin").is_file():
            path = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=offline,
                                          cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise CheckpointError(source, "not in the local HuggingFace cache"
                              + (" and HF_HUB_OFFLINE is set" if offline else " and the Hub cannot be reached")) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise CheckpointError(source, f"cannot be downloaded ({first_line(error)})") from None
    return path


def read_hf_dir(path: Path, meta: dict[str, Any]) -> tuple[ViTConfig, dict[str, Tensor], dict[str, Any]]:
    """Read a transformers ViT (`model_type: vit`) or DeiT-with-teacher (`deit`) directory.
    Returns (config, vitkit state dict, extras with class_names and preprocessing)."""
    path = Path(path)
    config_file = path / "config.json"
    model_type = meta.get("model_type")
    deit = model_type == "deit"
    if meta.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(config_file, f"hidden_act {meta['hidden_act']!r}: vitkit's MLP uses exact GELU only")
    state = read_weights(path)
    keys = KeyTracker(state, source=str(path))
    root = next((p for p in ("vit.", "deit.", "") if f"{p}embeddings.cls_token" in keys), None)
    if root is None:
        raise CheckpointError(path, "no embeddings.cls_token in the weights: not a ViT / DeiT checkpoint")
    if deit and "cls_classifier.weight" not in keys and "classifier.weight" in keys:
        raise CheckpointError(path, "DeiTForImageClassification (a class head without the distillation head) is "
                                    "not supported; use the ...WithTeacher checkpoint")
    try:
        fields = _config_fields(meta)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(config_file, f"not a usable ViT config ({error})") from None
    out = keys.out
    e = f"{root}embeddings."
    out["cls_token"] = keys.take(e + "cls_token")
    out["pos_embed"] = keys.take(e + "position_embeddings")
    out["patch_embed.proj.weight"] = keys.take(e + "patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = keys.take(e + "patch_embeddings.projection.bias")
    keys.ignore(e + "mask_token")  # used only for masked-image-modelling pre-training
    if deit:
        out["dist_token"] = keys.take(e + "distillation_token")
    spelling = 0 if keys.has_prefix(f"{root}encoder.layer.") else 1
    layer = f"{root}encoder.layer." if spelling == 0 else f"{root}layers."
    try:
        depth = block_count(state, layer)
    except ValueError as error:
        raise CheckpointError(path, str(error)) from None
    if depth != fields["depth"]:
        raise CheckpointError(path, f"{depth} encoder layers in the weights, num_hidden_layers={fields['depth']} in config.json")
    for i in range(depth):
        src = f"{layer}{i}."
        for ours, names in _LAYER.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{leaf}"] = keys.take(f"{src}{names[spelling]}.{leaf}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([keys.take(f"{src}{_QKV[n][spelling]}.weight") for n in "qkv"])
        if fields["qkv_bias"]:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([keys.take(f"{src}{_QKV[n][spelling]}.bias") for n in "qkv"])
    out["norm.weight"] = keys.take(f"{root}layernorm.weight")
    out["norm.bias"] = keys.take(f"{root}layernorm.bias")
    heads = ("cls_classifier", "distillation_classifier") if deit else ("classifier",)
    if f"{root}pooler.dense.weight" in keys and f"{heads[0]}.weight" in keys:
        # HF's classifiers are built without the pooler and skip its weights when a file has
        # them; so does this reader, or the logits would differ from HF's.
        keys.take(f"{root}pooler.dense.weight"), keys.take(f"{root}pooler.dense.bias")
    elif f"{root}pooler.dense.weight" in keys:
        # ViTModel's pooler, tanh(dense(first token)), is the paper's pre-logits layer.
        if meta.get("pooler_act", "tanh") != "tanh":
            raise CheckpointError(config_file, f"pooler_act {meta['pooler_act']!r}: only tanh is supported")
        out["pre_logits.fc.weight"] = keys.take(f"{root}pooler.dense.weight")
        out["pre_logits.fc.bias"] = keys.take(f"{root}pooler.dense.bias")
        fields["representation_size"] = out["pre_logits.fc.weight"].shape[0]
    if f"{heads[0]}.weight" in keys:
        out["head.weight"], out["head.bias"] = keys.take(f"{heads[0]}.weight"), keys.take(f"{heads[0]}.bias")
        if deit:
            out["head_dist.weight"] = keys.take(f"{heads[1]}.weight")
            out["head_dist.bias"] = keys.take(f"{heads[1]}.bias")
        fields["num_classes"] = out["head.weight"].shape[0]
    else:
        fields["num_classes"] = 0  # a bare ViTModel / DeiTModel: features (or pooler output) only
    state = keys.finish()
    fields["distill_token"] = deit
    try:
        config = ViTConfig(**fields)
    except ValueError as error:
        raise CheckpointError(config_file, str(error)) from None
    extras = {"class_names": _class_names(meta, config.num_classes, config_file),
              "preprocessing": _read_preprocessing(path / "preprocessor_config.json", config)}
    return config, state, extras


def read_weights(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(index, f"not a readable shard index ({error})") from None
        state: dict[str, Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(index, f"shard name {shard!r} points outside the directory")
            state.update(read_state_dict(path / shard))
        return state
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return read_state_dict(path / name)
    raise CheckpointError(path, f"a HuggingFace directory without weights ({' or '.join(WEIGHT_FILES)})")


def _config_fields(meta: dict[str, Any]) -> dict[str, Any]:
    known = _INERT | {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
                      "id2label", "pooler_output_size", "pooler_act"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ValueError(f"unknown config.json keys {unknown}")
    return dict(embed_dim=int(meta["hidden_size"]), depth=int(meta["num_hidden_layers"]),
                num_heads=int(meta["num_attention_heads"]), mlp_dim=int(meta["intermediate_size"]),
                norm_eps=float(meta.get("layer_norm_eps", 1e-12)), img_size=meta.get("image_size", 224),
                patch_size=meta.get("patch_size", 16), in_chans=int(meta.get("num_channels", 3)),
                qkv_bias=bool(meta.get("qkv_bias", True)))


def _class_names(meta: dict[str, Any], num_classes: int, config_file: Path) -> list[str] | None:
    id2label = meta.get("id2label")
    if not id2label or not num_classes:
        return None
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError) as error:
        raise CheckpointError(config_file, f"id2label must map class indices to names ({error})") from None
    if sorted(labels) != list(range(num_classes)):
        raise CheckpointError(config_file, f"id2label has {len(labels)} entries for a head of {num_classes} classes")
    names = [labels[i] for i in range(num_classes)]
    return None if names == [f"LABEL_{i}" for i in range(num_classes)] else names


def _read_preprocessing(path: Path, config: ViTConfig) -> Preprocessing | None:
    """HF's ViTImageProcessor resizes straight to (height, width), without a crop (resize_mode
    "exact"); a DeiT processor stretches, then centre-crops ("stretch"); `shortest_edge` sizes keep the aspect."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        size = meta.get("size", {"height": config.img_size[0], "width": config.img_size[1]})
        # Older processor files (the Hub's facebook/deit-*) give sizes as plain ints.
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if isinstance(meta.get("crop_size"), int):
            meta["crop_size"] = {"height": meta["crop_size"], "width": meta["crop_size"]}
        mode = "shorter"
        if "shortest_edge" in size:
            crop = meta.get("crop_size", {"height": size["shortest_edge"], "width": size["shortest_edge"]})
            resize, crop = int(size["shortest_edge"]), (int(crop["height"]), int(crop["width"]))
        else:
            resize, crop, mode = int(size["height"]), (int(size["height"]), int(size["width"])), "exact"
            if meta.get("do_center_crop") and "crop_size" in meta:  # DeiT: resize (stretching), then crop
                crop = (int(meta["crop_size"]["height"]), int(meta["crop_size"]["width"]))
                # A stretch to another aspect than the crop's is approximated by the shorter-side resize.
                mode = "stretch" if size["height"] == size["width"] else "shorter"
        normalise = meta.get("do_normalize", True)
        return Preprocessing(resize=resize, crop=crop, resize_mode=mode, interpolation=_RESAMPLE.get(meta.get("resample", 2), "bilinear"),
                             mean=tuple(meta.get("image_mean", (0.5, 0.5, 0.5))) if normalise else (0.0, 0.0, 0.0),
                             std=tuple(meta.get("image_std", (0.5, 0.5, 0.5))) if normalise else (1.0, 1.0, 1.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(path, f"not a usable image-processor config ({error})") from None


def write_hf_dir(model: Any, *, directory: str | Path) -> Path:
    """Write `model` as a transformers directory (config.json, model.safetensors,
    preprocessor_config.json) that `ViTForImageClassification.from_pretrained` loads, or
    `DeiTForImageClassificationWithTeacher` for a model with a distillation token.
    Raises VitkitError for models HF's ViT cannot express."""
    c = model.config
    refuse(c, target="HuggingFace ViT", unsupported={
        "average pooling": c.global_pool != "token", "register tokens": c.reg_tokens > 0, "qk-norm": c.qk_norm,
        "LayerScale": c.init_values is not None, "fc_norm": c.use_fc_norm, "hybrid stem": bool(c.hybrid_stem),
        "prefix tokens without position embeddings": not c.prefix_pos_embed,
        "pre-logits layer with a classifier (HF has the pooler only without one)":
            bool(c.representation_size) and c.num_classes > 0,
    })
    deit = c.distill_token
    root = "deit." if deit else "vit."
    if not c.num_classes:
        root = ""  # a bare ViTModel / DeiTModel
    sd = {k: as_float(v) for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    e = f"{root}embeddings."
    out[e + "cls_token"] = sd["cls_token"]
    out[e + "position_embeddings"] = sd["pos_embed"]
    out[e + "patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
    out[e + "patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
    if deit:
        out[e + "distillation_token"] = sd["dist_token"]
    for i in range(c.depth):
        dst = f"{root}encoder.layer.{i}."
        for ours, names in _LAYER.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{names[0]}.{leaf}"] = sd[f"blocks.{i}.{ours}.{leaf}"]
        for leaf in ("weight", "bias") if c.qkv_bias else ("weight",):
            for n, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3)):  # each (D, D) or (D,)
                out[f"{dst}{_QKV[n][0]}.{leaf}"] = part.contiguous()
    out[f"{root}layernorm.weight"], out[f"{root}layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
    if c.representation_size:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"]
    if c.num_classes:
        head = "cls_classifier" if deit else "classifier"
        out[f"{head}.weight"], out[f"{head}.bias"] = sd["head.weight"], sd["head.bias"]
        if deit:
            out["distillation_classifier.weight"] = sd["head_dist.weight"]
            out["distillation_classifier.bias"] = sd["head_dist.bias"]
    names = model.class_names or [f"LABEL_{i}" for i in range(c.num_classes)]
    square = c.img_size[0] == c.img_size[1] and c.patch_size[0] == c.patch_size[1]
    if c.num_classes:
        arch = "DeiTForImageClassificationWithTeacher" if deit else "ViTForImageClassification"
    else:
        arch = "DeiTModel" if deit else "ViTModel"
    meta = {
        "architectures": [arch], "model_type": "deit" if deit else "vit",
        "hidden_size": c.embed_dim, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
        "intermediate_size": c.mlp_dim, "hidden_act": "gelu", "layer_norm_eps": c.norm_eps,
        "image_size": c.img_size[0] if square else list(c.img_size),
        "patch_size": c.patch_size[0] if square else list(c.patch_size),
        "num_channels": c.in_chans, "qkv_bias": c.qkv_bias, "encoder_stride": c.patch_size[0],
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
    if c.representation_size:
        meta.update(pooler_output_size=c.representation_size, pooler_act="tanh")
    p = model.preprocessing
    processor = {
        "image_processor_type": "DeiTImageProcessor" if deit else "ViTImageProcessor",
        "do_resize": True, "size": {"height": p.crop[0], "width": p.crop[1]},
        "resample": {v: k for k, v in _RESAMPLE.items()}[p.interpolation],
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(p.mean), "image_std": list(p.std),
    }
    resized = p.resized_size(*p.crop)
    if deit and resized != p.crop:  # DeiT's processor can crop (ViT's cannot): resize, then crop
        processor.update(size={"height": resized[0], "width": resized[1]}, do_center_crop=True,
                         crop_size={"height": p.crop[0], "width": p.crop[1]})
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    for name, data in (("config.json", meta), ("preprocessor_config.json", processor)):
        text = json.dumps(data, indent=2)
        atomic_write(directory / name, lambda tmp, text=text: Path(tmp).write_text(text))
    return directory


__all__ = ["download_hf_hub", "read_hf_dir", "write_hf_dir"]
