"""One table of named variants: the paper's Table 1 (B, L, H) plus DeiT's Ti and S.

Every variant answers to three names:
  the paper's      ViT-B/16   (also ViT-B_16, the JAX checkpoints' file names)
  timm's           vit_base_patch16_224  (any resolution suffix: _384 builds a 384 px model)
  the short name   base       (the paper's default patch: 16, and 14 for huge)
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from .config import ViTConfig


@dataclass(frozen=True)
class Size:
    letter: str  # the paper's letter: Ti, S, B, L, H
    name: str  # timm's word: tiny, small, base, large, huge
    embed_dim: int  # D
    depth: int  # L
    num_heads: int
    mlp_dim: int
    default_patch: int


# Paper Table 1; Ti and S from DeiT (Touvron et al., 2021, Table 1).
SIZES: tuple[Size, ...] = (
    Size("Ti", "tiny", 192, 12, 3, 768, 16),
    Size("S", "small", 384, 12, 6, 1536, 16),
    Size("B", "base", 768, 12, 12, 3072, 16),
    Size("L", "large", 1024, 24, 16, 4096, 16),
    Size("H", "huge", 1280, 32, 16, 5120, 14),
)
PATCH_SIZES = (8, 14, 16, 32)
DEFAULT_IMG_SIZE = 224

_BY_LETTER = {s.letter.lower(): s for s in SIZES}
_BY_NAME = {s.name: s for s in SIZES}

# Extra named models beyond the size x patch grid (hybrids, small-image recipes, DeiT):
# name -> (base name, overrides). Modules that define such models register them here.
EXTRA_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}  # lower-cased name -> (base, overrides)
_EXTRA_DISPLAY: list[str] = []  # the names as registered, for list_models
# Named models whose published weights expect another input normalisation than the paper's
# (mean = std = 0.5): lower-cased name -> Preprocessing fields (mean, std, interpolation).
_PREPROCESSING: dict[str, dict[str, Any]] = {}

_PAPER = re.compile(r"^vit-(ti|s|b|l|h)[/_](\d+)$")
_TIMM = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)(?:_(\d+))?$")


def register_model(name: str, base: str, *, preprocessing: dict[str, Any] | None = None, **overrides: Any) -> None:
    """Add a named model: `base` (any name resolve() accepts) with `overrides` applied.
    preprocessing: Preprocessing fields its published weights expect, when not the paper's."""
    if name.lower() not in EXTRA_MODELS:
        _EXTRA_DISPLAY.append(name)
    EXTRA_MODELS[name.lower()] = (base, overrides)
    if preprocessing:
        _PREPROCESSING[name.lower()] = dict(preprocessing)


def preprocessing_fields(name: str) -> dict[str, Any]:
    """The Preprocessing fields (mean, std, ...) the weights published under `name` expect; {} for the paper's."""
    return dict(_PREPROCESSING.get(name.strip().lower(), {}))


def _config_for(size: Size, patch: int, img_size: int) -> ViTConfig:
    return ViTConfig(img_size=img_size, patch_size=patch, embed_dim=size.embed_dim, depth=size.depth,
                     num_heads=size.num_heads, mlp_dim=size.mlp_dim)


def resolve(name: str) -> ViTConfig:
    """Return the ViTConfig a variant name stands for; unknown names list the close matches."""
    key = name.strip().lower()
    if key in EXTRA_MODELS:
        base, overrides = EXTRA_MODELS[key]
        return resolve(base).replace(**overrides)
    if key in _BY_NAME:
        size = _BY_NAME[key]
        return _config_for(size, size.default_patch, DEFAULT_IMG_SIZE)
    try:
        match = _PAPER.match(key)
        if match:
            return _config_for(_BY_LETTER[match.group(1)], int(match.group(2)), DEFAULT_IMG_SIZE)
        match = _TIMM.match(key)
        if match:
            img_size = int(match.group(3) or DEFAULT_IMG_SIZE)
            return _config_for(_BY_NAME[match.group(1)], int(match.group(2)), img_size)
    except ValueError as error:  # a name of the right form with numbers that do not fit (patch 15 at 224 px)
        raise ValueError(f"model name {name!r}: {error}{_close_matches(key)}") from None
    raise ValueError(f"unknown model name {name!r}{_close_matches(key)}")


def _close_matches(key: str) -> str:
    """'; did you mean ...?' with the known names nearest to `key`, as the table spells them."""
    spelled = {n.lower(): n for n in list_models()}
    close = difflib.get_close_matches(key, list(spelled), n=5, cutoff=0.5)
    return f"; did you mean {', '.join(spelled[c] for c in close)}?" if close else "; `vitkit.list_models()` lists them all"


def list_models() -> list[str]:
    """Every name the table knows: short, paper and timm forms (timm's at 224 px)."""
    names = [s.name for s in SIZES]
    for size in SIZES:
        for patch in PATCH_SIZES:
            names.append(f"ViT-{size.letter}/{patch}")
            names.append(f"vit_{size.name}_patch{patch}_{DEFAULT_IMG_SIZE}")
    names.extend(_EXTRA_DISPLAY)
    return names


def paper_name(config: ViTConfig) -> str | None:
    """The paper's name for a config of a standard size (ViT-B/16), or None."""
    for size in SIZES:
        if (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (
                size.embed_dim, size.depth, size.num_heads, size.mlp_dim):
            patch = config.stem_stride  # pixels per token: the patch, times a hybrid stem's stride
            name = f"ViT-{size.letter}/{patch[0]}" if patch[0] == patch[1] else f"ViT-{size.letter}/{patch[0]}x{patch[1]}"
            stem = config.hybrid_stem
            if stem and stem.get("type") == "resnet":
                # A registered hybrid's own name first, so that the name shown is one create_model
                # takes: AugReg's R+ViT-Ti/16 has 32 pixels per token.
                for registered in _EXTRA_DISPLAY:
                    other = resolve(registered) if "+ViT-" in registered else None
                    if other is not None and (other.embed_dim, other.depth, other.patch_size, other.hybrid_stem) == (
                            config.embed_dim, config.depth, config.patch_size, stem):
                        return registered
                layers = stem.get("layers", [])
                return f"R{3 * sum(layers) + 2}+{name}" if layers else f"R+{name}"  # R50 = 3 x (3+4+9) convs + 2
            return f"{name} (conv stem)" if stem else name
    return None


def heads_for_width(embed_dim: int) -> int | None:
    """The head count the standard table uses at this width, or None for a non-standard width."""
    for size in SIZES:
        if size.embed_dim == embed_dim:
            return size.num_heads
    return None
