"""Weights in foreign formats, one module each, both directions:

  hf.py        HuggingFace transformers ViT / DeiT directories, and `hf-hub:ORG/NAME`
  timm.py      timm state dicts (.safetensors, .pth, .bin)
  jax_npz.py   google-research/vision_transformer and big_vision `.npz` files

Readers return (ViTConfig, vitkit state dict, extras) for `vitkit.pretrained.build_from_checkpoint`;
writers take a VisionTransformer. `convert` joins the two. Hybrid (CNN-stem) checkpoints are read
by hooks that `vitkit.hybrid` registers in STEM_READERS; the plain converters only find them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, VitkitError

FORMATS = ("vitkit", "hf", "timm", "npz")

# Format name ("timm", "npz") -> reader of a hybrid stem. Called as
# reader(keys: KeyTracker, config_fields: dict) -> hybrid_stem config dict; it pops the stem's keys
# from `keys` and puts the stem's vitkit-named tensors into `keys.out`. Registered by vitkit.hybrid.
STEM_READERS: dict[str, Callable[..., dict[str, Any]]] = {}


class KeyTracker:
    """A checkpoint's tensors, handed out one key at a time, so keys nobody read can be named
    (STYLE habit 5) and a missing key fails with the file's name rather than a KeyError."""

    def __init__(self, tensors: dict[str, Any], *, source: str) -> None:
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)

    def take(self, key: str) -> Any:
        if key not in self.tensors:
            raise CheckpointError(self.source, f"missing key {key!r}")
        self.used.add(key)
        return self.tensors[key]

    def take_optional(self, key: str) -> Any | None:
        return self.take(key) if key in self.tensors else None

    def ignore(self, prefix: str) -> None:
        """Mark keys under `prefix` as read on purpose (say why at the call)."""
        self.used.update(k for k in self.tensors if k.startswith(prefix))

    def finish(self) -> dict[str, Tensor]:
        left = sorted(set(self.tensors) - self.used)
        if left:
            shown = ", ".join(left[:8]) + (", ..." if len(left) > 8 else "")
            raise CheckpointError(self.source, f"keys no converter reads: [{shown}] ({len(left)})")
        return self.out


def block_count(keys: Any, pattern_prefix: str) -> int:
    """The number of blocks named `{pattern_prefix}{i}.` (or `_{i}/`) with i = 0, 1, ...: blocks
    must be numbered without gaps."""
    indices = set()
    for key in keys:
        if key.startswith(pattern_prefix):
            head = key[len(pattern_prefix):].split(".", 1)[0].split("/", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"blocks {sorted(indices)} are not numbered 0..{len(indices) - 1}")
    return len(indices)


def patch_fields(weight: Any, fields: dict[str, Any], *, key: str, source: str) -> int:
    """Width, patch size and (for a plain stem) channels from the patch projection (D, C, P, Q);
    returns D."""
    if weight.ndim != 4:
        raise CheckpointError(source, f"{key} has {weight.ndim} dimensions, expected 4 (a patch convolution)")
    fields.update(embed_dim=int(weight.shape[0]), patch_size=(int(weight.shape[2]), int(weight.shape[3])))
    if "hybrid_stem" not in fields:
        fields["in_chans"] = int(weight.shape[1])
    return int(weight.shape[0])


def square_grid(num_patches: int) -> int | None:
    side = int(round(num_patches ** 0.5))
    return side if side * side == num_patches and side > 0 else None


UNRECORDED_NORM_EPS = 1e-6  # LayerNorm eps of timm and the JAX reference, which neither's files record


def warn_unrecorded_eps(config: Any, path: Path, *, layout: str, hint: str = "") -> None:
    """Warn when `config`'s LayerNorm eps (HF's models use 1e-12) is not the one a `layout` file
    is read back with; the logits of the file's model then differ slightly."""
    if config.norm_eps != UNRECORDED_NORM_EPS:
        import warnings

        warnings.warn(f"{path}: this model's LayerNorm eps is {config.norm_eps:g}, and a {layout} cannot say so: "
                      f"it reads back with {UNRECORDED_NORM_EPS:g} (logits differ slightly){hint}", stacklevel=3)


def refuse(model: Any, *, target: str, unsupported: dict[str, bool]) -> None:
    """Raise VitkitError listing the features of `model` that format `target` cannot express."""
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise VitkitError(f"the {target} format cannot express this model's {', '.join(found)}; "
                          f"convert it to vitkit (or a format that has them) instead")


def as_float(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32).contiguous()


_DIRECTORY_FILES = {"vitkit": ("config.json", "model.safetensors"),
                    "hf": ("config.json", "model.safetensors", "preprocessor_config.json")}


def convert(*, source: str | Path, destination: str | Path, to: str, model: str | None = None) -> Path:
    """Load `source` (anything `vitkit.load_pretrained` reads, or a variant name for random weights)
    and write it to `destination` in format `to`: "vitkit" or "hf" (directories), "timm"
    (.safetensors, or .pth/.bin), "npz" (the original JAX layout). `model` names the variant for files that cannot say it.
    Returns the path written. Raises VitkitError if the target format cannot express the model."""
    if to not in FORMATS:
        raise VitkitError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    destination = Path(destination)
    if not str(source).startswith("hf-hub:") and Path(source).exists():
        src, dst = Path(source).resolve(), destination.resolve()
        # Refused when a file the conversion writes is one the source reads (RUN -> RUN/best,
        # DIR -> DIR/model.safetensors): it would be overwritten before it was read whole.
        writes = {dst / name for name in _DIRECTORY_FILES[to]} if to in _DIRECTORY_FILES else {dst}
        reads = set(src.rglob("*")) | {src} if src.is_dir() else {src}
        if dst == src or writes & reads:
            raise VitkitError(f"{destination}: overlaps the source {source}; write the conversion somewhere else")
    from ..pretrained import load_or_create

    loaded = load_or_create(str(source), model=model)
    if to == "vitkit":
        return loaded.save_pretrained(destination)
    if to == "hf":
        from .hf import write_hf_dir

        return write_hf_dir(loaded, directory=destination)
    if to == "timm":
        from .timm import write_timm_state_dict

        return write_timm_state_dict(loaded, path=destination)
    from .jax_npz import write_npz

    if destination.suffix.lower() != ".npz":
        # Readers (vitkit's, timm's, numpy's) know the format by this suffix.
        raise VitkitError(f"{destination}: the JAX layout is written as a .npz file; name it {destination.name}.npz")
    return write_npz(loaded, path=destination)


__all__ = ["convert", "FORMATS", "STEM_READERS", "KeyTracker"]
