"""ViTConfig: every architectural choice of a Vision Transformer in one place.

Defaults follow the paper (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"),
ViT-B/16 at 224 px. Where a peer implementation chose differently, the comment says so.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Any


def to_2tuple(value: int | tuple[int, int] | list[int], *, name: str = "size") -> tuple[int, int]:
    """An int or a pair of ints as (H, W); anything else (a string "14", 16.5, a triple) is a
    ValueError naming `name`, never a silent misreading."""
    if _is_int(value):
        return (int(value), int(value))
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise ValueError(f"{name}: expected an int or a pair of ints (got {value!r})")
    return (int(value[0]), int(value[1]))


def unknown_keys(cls: type, data: dict[str, Any]) -> list[str]:
    """The keys of `data` that no field of the dataclass `cls` reads, sorted (STYLE habit 5)."""
    return sorted(set(data) - {f.name for f in dataclasses.fields(cls)})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's ints too


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ViTConfig:
    # --- input and patches (paper Sec. 3.1, Eq. 1) ---
    img_size: tuple[int, int] = (224, 224)  # (H, W); need not be square
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    # --- transformer (paper Table 1) ---
    embed_dim: int = 768  # D
    depth: int = 12  # L
    num_heads: int = 12
    mlp_dim: int = 3072  # the paper states the MLP size directly rather than a ratio
    qkv_bias: bool = True  # the paper's JAX code has biases on q, k, v; some later models drop them
    qk_norm: bool = False  # LayerNorm on q and k (ViT-22B); not in the paper
    norm_eps: float = 1e-6  # the JAX reference uses 1e-6; HF transformers' ViT defaults to 1e-12
    init_values: float | None = None  # LayerScale (CaiT); None disables it, as in the paper
    # --- tokens and position embeddings (Sec. 3.1, Eq. 1) ---
    class_token: bool = True  # the paper's [class] token; False means average pooling of patches
    reg_tokens: int = 0  # register tokens (Darcet et al., 2023); not in the paper
    # Whether the prefix tokens ([class], registers) get a position embedding. The paper gives
    # the [class] token one; timm's `no_embed_class=True` models and big_vision do not.
    prefix_pos_embed: bool = True
    pos_embed_interpolation: str = "bicubic"  # how position embeddings resample to other grids
    # --- output ---
    global_pool: str = "token"  # "token": the [class] token's output; "avg": mean of patch tokens
    # With average pooling timm normalises the pooled vector (fc_norm) instead of every token;
    # None picks that behaviour from global_pool, as timm does.
    fc_norm: bool | None = None
    representation_size: int | None = None  # the pre-training head's tanh hidden layer (Sec. 3.1)
    num_classes: int = 1000
    # --- regularisation ---
    drop_rate: float = 0.0  # dropout after embeddings and in the MLP (paper Appendix B.1)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, not in the paper; DeiT's recipe uses 0.1
    # --- stem ---
    # Hybrid ViT (paper Sec. 3.1 "Hybrid Architecture"): a CNN computes the feature map that is
    # then cut into patches. None is the plain ViT; see vitkit.hybrid for the accepted specs.
    hybrid_stem: dict[str, Any] | None = None
    # DeiT's distillation token (Touvron et al., 2021): a second prefix token with its own head.
    distill_token: bool = False

    def __post_init__(self) -> None:
        self.img_size = to_2tuple(self.img_size, name="ViTConfig.img_size")
        self.patch_size = to_2tuple(self.patch_size, name="ViTConfig.patch_size")
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (H, W) at the configured image size."""
        stride = self.stem_stride
        return (self.img_size[0] // stride[0], self.img_size[1] // stride[1])

    @property
    def stem_stride(self) -> tuple[int, int]:
        """Input pixels per output token along (H, W), including a hybrid CNN's downsampling."""
        factor = self.hybrid_stem.get("stride", 1) if self.hybrid_stem else 1
        return (self.patch_size[0] * factor, self.patch_size[1] * factor)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    # ------------------------------------------------------------------ checks and (de)serialisation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot build a model."""

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"ViTConfig.{name}: {message} (got {getattr(self, name)!r})")

        for name in ("in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            need(_is_int(value) and value > 0, name, "must be a positive integer")
        for name in ("qkv_bias", "qk_norm", "class_token", "prefix_pos_embed", "distill_token"):
            # JSON configs are checked here too: a string "false" would otherwise switch the option on.
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        need(self.fc_norm is None or isinstance(self.fc_norm, bool), "fc_norm", "must be true, false or null")
        need(self.init_values is None or _is_number(self.init_values) and self.init_values > 0, "init_values",
             "must be a positive number or null")
        need(self.hybrid_stem is None or isinstance(self.hybrid_stem, dict), "hybrid_stem", "must be an object or null")
        stem_stride = (self.hybrid_stem or {}).get("stride", 1)
        need(_is_int(stem_stride) and stem_stride >= 1, "hybrid_stem", "its 'stride' must be an integer >= 1")
        need(_is_int(self.num_classes) and self.num_classes >= 0, "num_classes", "must be an integer >= 0")
        need(_is_int(self.reg_tokens) and self.reg_tokens >= 0, "reg_tokens", "must be an integer >= 0")
        need(all(p > 0 for p in self.patch_size), "patch_size", "must be positive")
        need(self.embed_dim % self.num_heads == 0, "embed_dim", f"must be divisible by num_heads={self.num_heads}")
        need(self.global_pool in ("token", "avg"), "global_pool", "must be 'token' or 'avg'")
        need(not self.distill_token or self.class_token, "distill_token",
             "needs class_token=True: DeiT's distillation token sits beside the [class] token")
        need(not self.distill_token or self.global_pool == "token", "distill_token",
             "needs global_pool='token': DeiT's two heads read the [class] and [dist] tokens")
        need(self.global_pool != "token" or self.class_token, "global_pool",
             "'token' pooling needs class_token=True; use global_pool='avg' without a class token")
        stride = self.stem_stride
        need(all(s > 0 and s % p == 0 for s, p in zip(self.img_size, stride)), "img_size",
             f"must be positive and divisible by the stride {stride}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            need(_is_number(value) and 0.0 <= value < 1.0, name, "must lie in [0, 1)")
        need(_is_number(self.norm_eps) and self.norm_eps > 0, "norm_eps", "must be positive")
        need(self.representation_size is None or _is_int(self.representation_size) and self.representation_size > 0,
             "representation_size", "must be a positive integer or null")
        need(self.pos_embed_interpolation in ("bicubic", "bilinear", "nearest", "area"),
             "pos_embed_interpolation", "must be bicubic, bilinear, nearest or area")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["img_size"] = list(self.img_size)
        data["patch_size"] = list(self.patch_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ViTConfig":
        """Build a config from a dict, failing on keys no field reads (STYLE habit 5)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the model config must be a JSON object, got {type(data).__name__}")
        unknown = unknown_keys(cls, data)
        if unknown:
            raise ValueError(f"{source}: unknown model config keys {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None

    def replace(self, **changes: Any) -> "ViTConfig":
        return ViTConfig.from_dict({**self.to_dict(), **changes}, source="overrides")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


RESIZE_MODES = ("shorter", "exact", "stretch")  # see Preprocessing.resize_mode


@dataclass
class Preprocessing:
    """How an image becomes the model's input: resize, centre crop, scale to [0, 1], normalise."""

    resize: int = 256  # the shorter side, before the crop; ImageNet-style 256 -> 224
    crop: tuple[int, int] = (224, 224)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # the JAX reference maps pixels to [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # "shorter": the shorter side to `resize`, then the centre crop (aspect kept). "exact": straight
    # to the crop size, aspect not kept, as HF's ViTImageProcessor does; `resize` is then unused.
    # "stretch": straight to the crop's shape scaled so its shorter side is `resize` (aspect not
    # kept), then the centre crop, as HF's DeiTImageProcessor does (256 x 256, then 224).
    resize_mode: str = "shorter"

    def __post_init__(self) -> None:
        self.crop = to_2tuple(self.crop, name="Preprocessing.crop")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"Preprocessing.interpolation: unknown mode {self.interpolation!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Preprocessing.std: must be positive (got {self.std})")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"Preprocessing.resize_mode: one of {RESIZE_MODES} (got {self.resize_mode!r})")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) an image of this size is resized to before the centre crop."""
        crop_h, crop_w = self.crop
        if self.resize_mode == "exact":
            return crop_h, crop_w
        if self.resize_mode == "stretch":
            scale = self.resize / min(crop_h, crop_w)
            return max(crop_h, round(crop_h * scale)), max(crop_w, round(crop_w * scale))
        # The shorter side goes to `resize`, but never below the crop, so non-square crops fit.
        scale = max(self.resize / min(height, width), crop_h / height, crop_w / width)
        return max(crop_h, round(height * scale)), max(crop_w, round(width * scale))

    @classmethod
    def for_size(cls, img_size: tuple[int, int], **kwargs: Any) -> "Preprocessing":
        """The usual evaluation transform for a model input of img_size: resize by 8/7, then crop."""
        img_size = to_2tuple(img_size)
        resize = img_size[0] if min(img_size) <= 64 else int(round(min(img_size) * 256 / 224))
        return cls(resize=resize, crop=img_size, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = {"resize": self.resize, "crop": list(self.crop), "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}
        if self.resize_mode != "shorter":  # files of the usual mode stay readable by older versions
            data["resize_mode"] = self.resize_mode
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "preprocessing") -> "Preprocessing":
        if not isinstance(data, dict) or unknown_keys(cls, data):
            known = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"{source}: preprocessing must be an object with keys {sorted(known)}, got {data!r}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None


__all__ = ["ViTConfig", "Preprocessing", "to_2tuple"]
