"""A training run's settings: `TrainConfig`, filled in from a recipe and checked."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..config import unknown_keys
from ..errors import VitkitError
from ..recipes import get_recipe

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Everything a training run depends on. None means "the recipe's value" (see recipes.py);
    the resolved config, with every value filled in, is saved as RUN/config.json."""

    model: str | None = None  # any name create_model accepts; default: the recipe's small-image ViT
    model_overrides: dict[str, Any] | None = None  # ViTConfig fields applied to `model`
    init: str | None = None  # start from any load_pretrained source (new head, resampled pos-embed)
    patch_size: int | None = None
    img_size: int | None = None  # pixels; default: the model's (or the --init checkpoint's)
    epochs: int | None = None
    batch_size: int | None = None  # global images per forward pass, across all processes
    lr: float | None = None  # peak LR after warmup
    min_lr: float | None = None  # LR at the end of the cosine
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    data: str | None = None  # folder, archive or cifar10 (see vitkit.data); None: the embedded sample
    max_train: int | None = None  # keep a random subset of this many training images
    out: str | None = None  # run directory; default runs/<timestamp>-<model>
    recipe: str | None = None  # default: "finetune" with --init, else "cifar"
    resume: str | None = None  # run directory to continue
    seed: int | None = None
    device: str | None = None  # default: cuda:<local rank> if available, else cpu
    precision: str | None = None  # bf16 | fp16 | fp32; default bf16 on GPUs that have it, else fp32
    compile: bool = False
    grad_accum: int | None = None
    workers: int = 0
    label_smoothing: float | None = None
    augment: str | None = None  # none | randaugment | trivialaugment; None: crop + flip only
    mixup: float | None = None  # Beta(alpha, alpha) for mixup; 0 disables
    cutmix: float | None = None
    random_erasing: float | None = None
    drop_path: float | None = None
    clip_grad: float | None = None  # max global gradient norm; None disables
    ema: float | None = None  # EMA decay per step (e.g. 0.999); None disables
    layer_decay: float | None = None
    distill_from: str | None = None  # teacher: any load_pretrained source (DeiT)
    distill_type: str | None = None  # hard | soft
    distill_alpha: float | None = None
    distill_tau: float | None = None
    checkpoint_every: int | None = None  # optimiser steps between RUN/last saves (also every epoch)
    strict: bool | None = None  # fail on the first unreadable image instead of skipping it
    fsdp: bool | None = None
    grad_checkpointing: bool | None = None
    fp8: bool | None = None  # the blocks' matmuls in FP8 (vitkit.fp8), for FP8 tensor cores; rounds more
    progress: bool = True  # tqdm bars on the terminal

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "train config") -> "TrainConfig":
        if not isinstance(data, dict):
            raise VitkitError(f"{source}: a training config must be a JSON object")
        unknown = unknown_keys(cls, data)
        if unknown:
            raise VitkitError(f"{source}: unknown training config keys {unknown}")
        for field in dataclasses.fields(cls):
            if field.name in data and not _has_type(data[field.name], str(field.type)):
                raise VitkitError(f"{source}: {field.name} must be {field.type} (got {data[field.name]!r})")
        return cls(**data)


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated like "int | None" or "dict[str, Any] | None"."""
    checks = {"None": lambda v: v is None, "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "dict": lambda v: isinstance(v, dict)}
    return any(checks[kind.split("[")[0].strip()](value) for kind in annotation.split("|"))


# Values for fields neither the user nor the recipe set.
_FALLBACK = dict(seed=0, grad_accum=1, min_lr=0.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0, random_erasing=0.0,
                 drop_path=0.0, distill_type="hard", distill_tau=3.0, strict=False, fsdp=False,
                 grad_checkpointing=False, fp8=False, augment=None)


_PATH_FIELDS = ("data", "init", "distill_from")


def absolute_if_local(value: str | None) -> str | None:
    """A path that exists here made absolute, so that a run resumes from any working directory;
    anything else (cifar10, hf-hub:..., None) as it is."""
    return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value


def absolute_paths(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, **{name: absolute_if_local(getattr(config, name)) for name in _PATH_FIELDS})


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill every unset field from the recipe, then from fallbacks; check the values."""
    config = absolute_paths(config)
    given = [flag for flag, value in (("--distill-type", config.distill_type), ("--distill-alpha", config.distill_alpha),
                                      ("--distill-tau", config.distill_tau)) if value is not None]
    if given and not config.distill_from:
        raise VitkitError(f"{', '.join(given)} need(s) --distill-from TEACHER")
    recipe = get_recipe(config.recipe or ("finetune" if config.init else "cifar"))
    values = config.to_dict()
    values["recipe"] = recipe.name
    for key, value in recipe.values.items():
        if key in ("model", "model_overrides") and (config.init or config.model):
            continue  # the recipe's default model applies only when nothing names a model
        if values.get(key) is None:
            values[key] = value
    for key, value in _FALLBACK.items():
        if values.get(key) is None:
            values[key] = value
    if values["model"] is None and not config.init:
        values["model"] = "vit_cifar"  # a recipe without a model of its own (finetune, deit): recorded, not implied
    if values.get("distill_alpha") is None:
        # DeiT: hard distillation weighs labels and teacher equally; soft uses lambda = 0.1 (with tau = 3).
        values["distill_alpha"] = 0.1 if values["distill_type"] == "soft" else 0.5
    if config.lr is None and config.model and not config.init and "model" in recipe.values:
        # The recipe's LR suits its own small model; a model the user names (often far wider) gets
        # DeiT's rule, 5e-4 per 512 images of effective batch, floored for small batches.
        values["lr"] = max(5e-4 * values["batch_size"] * values["grad_accum"] / 512, 1e-4)
    if config.min_lr is None and values["min_lr"] > values["lr"]:
        values["min_lr"] = values["lr"]  # the recipe's floor is for its own LR, not one set far below it
    resolved = TrainConfig(**values)
    check_values(resolved)
    # New runs only: older runs saved with a negative seed (torch took one) must still resume.
    if not 0 <= resolved.seed < 2 ** 63:
        raise VitkitError(f"--seed must lie in [0, 2^63) (got {resolved.seed})")
    return resolved


def check_values(resolved: TrainConfig) -> None:
    """Ranges and choices of a resolved config (from the command line or a saved run)."""
    if resolved.precision is not None and resolved.precision not in PRECISIONS:
        raise VitkitError(f"--precision {resolved.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if resolved.distill_type not in ("hard", "soft"):
        raise VitkitError(f"--distill-type {resolved.distill_type!r}: expected hard or soft")
    if resolved.distill_alpha is not None and not 0 <= resolved.distill_alpha <= 1:
        raise VitkitError(f"--distill-alpha must lie in [0, 1] (got {resolved.distill_alpha})")
    if resolved.distill_tau is not None and not (math.isfinite(resolved.distill_tau) and resolved.distill_tau > 0):
        raise VitkitError(f"--distill-tau must be a finite number above 0 (got {resolved.distill_tau})")
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(resolved, name) is None or getattr(resolved, name) < 1:
            raise VitkitError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(resolved, name)})")
    if resolved.lr is None or not math.isfinite(resolved.lr) or resolved.lr <= 0:
        raise VitkitError(f"--lr must be positive (got {resolved.lr})")
    if resolved.recipe is not None:
        get_recipe(resolved.recipe)  # names the known ones
    # (flag, value, lowest, highest, whether the highest is allowed); None values mean "off".
    ranges = [("--min-lr", resolved.min_lr, 0.0, resolved.lr, True),
              ("--weight-decay", resolved.weight_decay, 0.0, math.inf, False),
              ("--warmup-epochs", resolved.warmup_epochs, 0.0, math.inf, False),
              ("--label-smoothing", resolved.label_smoothing, 0.0, 1.0, False),
              ("--mixup", resolved.mixup, 0.0, math.inf, False),
              ("--cutmix", resolved.cutmix, 0.0, math.inf, False),
              ("--random-erasing", resolved.random_erasing, 0.0, 1.0, True),
              ("--drop-path", resolved.drop_path, 0.0, 1.0, False)]
    for flag, value, low, high, high_ok in ranges:
        if value is not None and not (math.isfinite(value) and low <= value and (value < high or high_ok and value == high)):
            top = f"{high:g}]" if high_ok else ("inf)" if math.isinf(high) else f"{high:g})")
            raise VitkitError(f"{flag} must lie in [{low:g}, {top} (got {value})")
    if resolved.clip_grad is not None and not (math.isfinite(resolved.clip_grad) and resolved.clip_grad > 0):
        raise VitkitError(f"--clip-grad must be a positive norm (got {resolved.clip_grad}); leave it out to disable")
    for flag, value in (("--img-size", resolved.img_size), ("--patch-size", resolved.patch_size),
                        ("--max-train", resolved.max_train)):
        if value is not None and value < 1:
            raise VitkitError(f"{flag} must be at least 1 (got {value})")
    if resolved.workers is not None and resolved.workers < 0:
        raise VitkitError(f"--workers must be 0 or more (got {resolved.workers})")
    if resolved.layer_decay is not None and not 0 < resolved.layer_decay <= 1:
        raise VitkitError(f"--layer-decay must lie in (0, 1] (got {resolved.layer_decay})")
    if resolved.ema is not None and not 0 < resolved.ema < 1:
        raise VitkitError(f"--ema must lie in (0, 1), e.g. 0.999 (got {resolved.ema})")
    if resolved.ema is not None and resolved.fsdp:
        raise VitkitError("--ema with --fsdp is not supported: the EMA would need the full weights on every rank")
    if resolved.checkpoint_every is not None and resolved.checkpoint_every < 1:
        raise VitkitError(f"--checkpoint-every must be at least 1 step (got {resolved.checkpoint_every})")
