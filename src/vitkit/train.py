"""`vitkit train`: the training loop, short enough to read in a sitting.

    config -> run directory -> data -> model -> optimiser -> (resume) -> epochs of steps -> summary

One process per device; under torchrun the processes form a DistributedDataParallel (or, with
--fsdp, a fully_shard) group. `batch_size` is the global batch of one forward pass across all
processes; an optimiser step sees batch_size * grad_accum images. Every random choice (data
order, augmentation, mixup, dropout) is keyed by the seed and the step, so a resumed run
retraces the uninterrupted one exactly; mixup and dropout are also keyed by the rank, so the
processes, which see different samples, do not draw the same masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_train_state, recover, restore_rng, rng_state, save_checkpoint
from .errors import CheckpointError, VitkitError
from .images import require_rgb
from .mixup import mix_batch
from .model import VisionTransformer
from .optim import build_optimizer, lr_at, set_lr
from .recipes import get_recipe

RUN_CONFIG = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PRECISIONS = ("bf16", "fp16", "fp32")
# Fields a resumed run may change: where and how fast it runs, not what it computes.
# The checkpoint holds full, unsharded states, so DDP <-> FSDP may change too.
_RESUMABLE_CHANGES = {"resume", "device", "workers", "out", "compile", "checkpoint_every", "progress", "epochs",
                      "fsdp"}


class TrainingDiverged(VitkitError):
    """The loss became NaN or infinite at optimiser step `step` (0-based); the last good
    checkpoint is kept."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
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


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, **{name: absolute_if_local(getattr(config, name)) for name in _PATH_FIELDS})


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill every unset field from the recipe, then from fallbacks; check the values."""
    config = _absolute_paths(config)
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
    if resolved.distill_tau is not None and resolved.distill_tau <= 0:
        raise VitkitError(f"--distill-tau must be positive (got {resolved.distill_tau})")
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


# ---------------------------------------------------------------------------- processes and devices
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_hint: str | None) -> _Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also across machines with --nnodes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def _device(config: TrainConfig, dist: _Dist) -> torch.device:
    if config.device:
        from .infer import resolve_device

        device = resolve_device(config.device)
        if device.type == "cuda" and dist.world_size > 1:
            device = torch.device("cuda", dist.local_rank)
        return device
    return torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _all_mean(values: Tensor, dist: _Dist) -> Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(values)
        values = values / dist.world_size
    return values


def _all_sum(values: Tensor, dist: _Dist) -> Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(values)
    return values


def _barrier(dist: _Dist) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()


# ---------------------------------------------------------------------------- run directory
def _prepare_run(config: TrainConfig) -> tuple[TrainConfig, Path, dict[str, Any] | None]:
    """Resolve the config and the run directory; on --resume, read the saved config and state."""
    # (--data '' is vitkit.data's to refuse, as for every command that reads data.)
    for flag, value in (("--resume", config.resume), ("--init", config.init), ("--distill-from", config.distill_from),
                        ("--out", config.out)):
        if value is not None and not str(value).strip():
            raise VitkitError(f"{flag} '': an empty path (an unset variable?)")
    if config.resume:
        run_dir = Path(config.resume)
        config_file = run_dir / RUN_CONFIG
        if not config_file.is_file():
            raise VitkitError(f"--resume {run_dir}: not a training run directory (no {RUN_CONFIG})")
        try:
            saved = TrainConfig.from_dict(json.loads(config_file.read_text()), source=str(config_file))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise VitkitError(f"{config_file}: not a readable training config ({error})") from None
        try:
            check_values(saved)
        except VitkitError as error:
            raise VitkitError(f"{config_file}: {error}") from None
        if config.fsdp and saved.ema is not None:
            raise VitkitError("--fsdp: this run keeps an EMA of the weights, which FSDP does not support")
        if config.out is not None and Path(config.out).resolve() != run_dir.resolve():
            raise VitkitError(f"--out {config.out}: a resumed run continues in its own directory {run_dir}; "
                              "leave --out out")
        for key, value in _absolute_paths(config).to_dict().items():
            if key in _RESUMABLE_CHANGES or value is None or value == getattr(saved, key):
                continue
            raise VitkitError(f"--resume {run_dir}: the run was trained with {key}={getattr(saved, key)!r}, "
                              f"not {key}={value!r}; start a new run (--out) to change it")
        for key in _RESUMABLE_CHANGES - {"resume", "out", "compile"}:
            if getattr(config, key) is not None:
                setattr(saved, key, getattr(config, key))
        saved.compile = saved.compile or config.compile  # a flag: leaving it out does not turn it off
        saved.resume = str(run_dir)
        check_values(saved)  # the changed settings too, before any of them reaches config.json
        recover(run_dir)
        if not (run_dir / "last").exists():
            # Stopped before its first checkpoint: nothing was learnt yet, so it starts again from step 0.
            print(f"--resume {run_dir}: no checkpoint yet; starting the run from the beginning", file=sys.stderr)
            return saved, run_dir, None
        state = load_train_state(run_dir)
        done = state.get("progress", {}).get("epoch", 0)
        if config.epochs is not None and config.epochs < done:
            raise VitkitError(f"--epochs {config.epochs}: the run in {run_dir} has already trained {done} epochs")
        return saved, run_dir, state
    resolved = resolve_config(config)
    if resolved.out:
        run_dir = Path(resolved.out)
    else:
        name = (resolved.model or Path(str(resolved.init)).name or "model").replace("/", "_").replace(":", "_")
        run_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    if any((run_dir / name).exists() for name in ("last", "best", RUN_CONFIG)):
        from .pretrained import _is_model_config

        if _is_model_config(run_dir / RUN_CONFIG):  # RUN/best, a saved model: not a run to --resume
            raise VitkitError(f"--out {run_dir}: holds a saved model; choose another directory")
        raise VitkitError(f"--out {run_dir}: already holds a training run; continue it with --resume {run_dir} "
                          "or choose another directory")
    resolved.out = str(run_dir)
    return resolved, run_dir, None


def _write_json(path: Path, data: Any) -> None:
    from .weights import atomic_write

    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class _MetricsLog:
    """metrics.jsonl: one JSON object a line, {"kind": "step"|"epoch"|"event", ...}."""

    def __init__(self, path: Path, *, keep_until_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # A resumed run redoes the steps after its checkpoint: drop their records (and a
            # line a kill cut short), so the log reads as one uninterrupted run.
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until_step]
            write_metrics(path, kept)
        self.handle = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.handle:
            try:
                self.handle.write(json.dumps(record) + "\n")
                self.handle.flush()
            except OSError as error:  # a full disk: say which file, the checkpoints are not touched
                from .checkpoint import write_failure

                raise VitkitError(f"{self.path}: cannot be written ({write_failure(error, where=self.path.parent)})") from None

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a metrics.jsonl with `records`, atomically (a resumed run drops redone steps)."""
    from .weights import atomic_write

    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping a last line cut short by a crash."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---------------------------------------------------------------------------- model
def _build_model(config: TrainConfig, *, num_classes: int, class_names: list[str] | None = None) -> VisionTransformer:
    from .pretrained import create_model, load_pretrained, set_img_size

    overrides: dict[str, Any] = dict(config.model_overrides or {})
    overrides["drop_path_rate"] = config.drop_path
    if config.distill_from:
        overrides["distill_token"] = True
    if config.init:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the replaced head is intended, not news
            try:
                model = load_pretrained(config.init, model=config.model, drop_path_rate=config.drop_path)
            except VitkitError as error:
                raise VitkitError(f"--init: {error}") from None
        if config.patch_size and (config.patch_size, config.patch_size) != model.config.patch_size:
            raise VitkitError(f"--patch-size {config.patch_size}: --init {config.init} has {model.config.patch_size} "
                              "patches, and pre-trained patch embeddings cannot change size")
        if model.class_names is None or model.class_names != class_names:
            # New classes (or the same count under other names) get a new head: the old one's
            # rows mean other things.
            model.reset_classifier(num_classes)
        if config.img_size:
            try:
                set_img_size(model, config.img_size)
            except ValueError as error:
                raise VitkitError(f"--img-size {config.img_size}: {error}") from None
        if config.distill_from and not model.config.distill_token:
            from .distill import add_distillation_token

            model = add_distillation_token(model)
        return model.train()
    if config.patch_size:
        overrides["patch_size"] = config.patch_size
    if config.img_size:
        overrides["img_size"] = config.img_size
    try:
        return create_model(config.model or "vit_cifar", num_classes=num_classes, **overrides)  # runs saved with model null
    except ValueError as error:
        given = [f"--{flag.replace('_', '-')} {getattr(config, flag)}" for flag in ("patch_size", "img_size")
                 if getattr(config, flag)]
        raise VitkitError(f"{', '.join([f'--model {config.model}'] + given)}: {error}") from None


def _init_preprocessing(config: TrainConfig):
    """With --init, the checkpoint's normalisation and interpolation carry over."""
    if not config.init:
        return None
    from .pretrained import read_checkpoint

    try:
        _, _, extras = read_checkpoint(config.init)
    except VitkitError as error:
        raise VitkitError(f"--init: {error}") from None
    return extras.get("preprocessing")


class _Distilled(nn.Module):
    """Lets DDP/FSDP wrap the two-headed forward DeiT trains with."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        if not self.training:  # evaluation: the two heads vote, as the plain forward does
            return self.model(x)
        return self.model.forward_distilled(x)


class _Ema:
    """Exponential moving average of the weights (Polyak averaging), kept in float32."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval().float()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, value in self.model.state_dict().items():
            new = current[name].detach()
            if value.dtype.is_floating_point:
                value.lerp_(new.to(value.dtype), 1.0 - self.decay)
            else:
                value.copy_(new)


# ---------------------------------------------------------------------------- one step
def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (B, K): label smoothing and mixup in one form."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def compute_loss(model: nn.Module, images: Tensor, targets: Tensor, labels: Tensor, *,
                 teacher: nn.Module | None, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """The training loss of one batch and the logits that accuracy is measured on."""
    if teacher is None:
        logits = model(images)
        return soft_cross_entropy(logits, targets), logits
    from .distill import distillation_loss

    cls_logits, dist_logits = model(images)
    with torch.no_grad():
        teacher_logits = teacher(images)
    loss = distillation_loss(cls_logits, dist_logits, teacher_logits, targets, kind=config.distill_type,
                             tau=config.distill_tau, alpha=config.distill_alpha, base_loss=soft_cross_entropy)
    return loss, (cls_logits + dist_logits) / 2


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, precision: str, dist: _Dist) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole validation split, summed across processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for images, labels in loader.iterate(0):
        # A rank whose share of the last batch is empty still runs the forward pass: under FSDP
        # every rank must join each layer's all-gather.
        with _autocast(device, precision):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == labels).sum()
        totals[2] += labels.numel()
    totals = _all_sum(totals, dist)
    model.train(was_training)
    count = max(totals[2].item(), 1.0)
    return totals[0].item() / count, totals[1].item() / count


# ---------------------------------------------------------------------------- the run
def train(config: TrainConfig) -> dict[str, Any]:
    """Train a ViT as `config` says; write the run directory; return the summary (also in
    RUN/summary.json): best and final validation accuracy, wall time, images per second.

    Raises VitkitError (one line) for bad inputs, a diverging loss (TrainingDiverged), running
    out of GPU memory, or a checkpoint that cannot be saved.
    """
    dist = _init_distributed(config.device)
    try:
        return _train(config, dist)
    except torch.OutOfMemoryError:
        raise VitkitError(f"out of GPU memory at --batch-size {config.batch_size}: use a smaller --batch-size, "
                          "--grad-accum N to keep the effective batch, or --grad-checkpointing") from None
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):  # the CPU's out-of-memory error has no type of its own
            raise
        raise VitkitError(f"out of memory at --batch-size {config.batch_size}"
                          + (f", --img-size {config.img_size}" if config.img_size else "")
                          + ": use a smaller batch or image size, or --grad-accum N") from None
    finally:
        if dist.world_size > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _train(config: TrainConfig, dist: _Dist) -> dict[str, Any]:
    from .data import build_data

    cfg, run_dir, resume_state = _prepare_run(config)
    if dist.world_size > 1:
        import torch.distributed as tdist

        # The default directory name holds a timestamp: every process takes rank 0's. The barrier
        # keeps rank 0 from writing into it before the others have checked --out is free.
        name = [str(run_dir)]
        tdist.broadcast_object_list(name, src=0)
        run_dir = Path(name[0])
        cfg.out = cfg.out if cfg.resume else name[0]
        _barrier(dist)
    device = _device(cfg, dist)
    precision = cfg.precision or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    if cfg.batch_size % dist.world_size:
        raise VitkitError(f"--batch-size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    torch.manual_seed(cfg.seed)  # the same initial weights on every process

    build = cfg  # what the model is built from; cfg itself (saved in config.json) keeps --init as given
    if resume_state is not None and cfg.init:
        # The run's own checkpoint holds everything --init gave it (weights, head, tokens): resuming
        # must not need the original source again (deleted, moved, or on the Hub while offline).
        build = dataclasses.replace(cfg, init=str(run_dir / "last"))
    init_pre = _init_preprocessing(build)
    img_size = cfg.img_size
    if img_size is None:
        probe = _build_model(dataclasses.replace(build, distill_from=None), num_classes=1)
        img_size = probe.config.img_size
    data = build_data(cfg.data, img_size=img_size, batch_size=cfg.batch_size // dist.world_size, device=device,
                      augment=cfg.augment, random_erasing=cfg.random_erasing, workers=cfg.workers, seed=cfg.seed,
                      rank=dist.rank, world_size=dist.world_size, strict=cfg.strict, max_train=cfg.max_train,
                      mean=init_pre.mean if init_pre else None, std=init_pre.std if init_pre else None,
                      interpolation=init_pre.interpolation if init_pre else None)
    num_classes = len(data.class_names)
    torch.manual_seed(cfg.seed)
    raw = _build_model(build, num_classes=num_classes, class_names=list(data.class_names))
    require_rgb(raw, what="train")
    if cfg.init and cfg.model and resume_state is None:
        from .pretrained import check_named_model

        shape = {k: v for k, v in (cfg.model_overrides or {}).items()
                 if k in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")}
        if cfg.patch_size:
            shape["patch_size"] = cfg.patch_size
        check_named_model(raw.config, cfg.model, f"--init {cfg.init}", overrides=shape)
    raw.class_names = list(data.class_names)
    raw.preprocessing = data.preprocessing

    if resume_state is not None:
        _load_resumed_weights(raw, run_dir, cfg)
    raw.to(device)
    if dist.world_size > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in raw.modules()):
        _share_batch_norm(raw, device=device, main=dist.main)
    if cfg.grad_checkpointing:
        raw.set_grad_checkpointing(True)
    if cfg.fp8:
        _use_fp8(raw, device=device, main=dist.main)
    ema = _Ema(raw, cfg.ema) if cfg.ema else None
    if ema is not None and resume_state is not None and resume_state.get("ema") is not None:
        ema.model.load_state_dict(resume_state["ema"])

    module: nn.Module = _Distilled(raw) if cfg.distill_from else raw
    if dist.world_size > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in raw.blocks:
            fully_shard(block)
        fully_shard(module)
        wrapped = module
    elif dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = module
    optimizer = build_optimizer(raw, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                depth=raw.config.depth)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    teacher = None
    if cfg.distill_from:
        from .distill import check_teacher_classes, load_teacher

        try:
            teacher = load_teacher(cfg.distill_from, num_classes=num_classes, device=device)
        except VitkitError as error:
            raise VitkitError(error if str(error).startswith("--distill-from") else f"--distill-from: {error}") from None
        check_teacher_classes(teacher, list(data.class_names), source=f"--distill-from {cfg.distill_from}")
    train_model = torch.compile(wrapped) if cfg.compile else wrapped

    steps_per_epoch = math.ceil(len(data.train) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch)  # a warm-up past the end is all warm-up
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_acc": -1.0, "best_epoch": -1, "skipped_steps": 0,
                "train_time": 0.0, "images": 0}
    if resume_state is not None:
        _restore_optimizer(wrapped, optimizer, resume_state["optimizer"], dist)
        scaler.load_state_dict(resume_state["scaler"]) if resume_state.get("scaler") else None
        progress.update(resume_state["progress"])
        _resume_rng(resume_state, seed=cfg.seed, rank=dist.rank, step=progress["step"], device=device)
    elif dist.rank > 0:
        # The weights are built, identical everywhere; from here each rank draws its own dropout
        # and stochastic-depth masks. Rank 0 keeps the stream of a one-process run.
        torch.manual_seed(_rank_seed(cfg.seed, dist.rank))

    if dist.main:
        # Made once the data, model and teacher are known to work: a run that fails to start
        # leaves no directory (nor a config.json claiming it) behind.
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / RUN_CONFIG, {**cfg.to_dict(), "precision": precision})
    log = _MetricsLog(run_dir / METRICS_FILE, keep_until_step=progress["step"] if cfg.resume else None,
                      enabled=dist.main)
    if dist.main:
        from .info import describe

        print(describe(raw), file=sys.stderr)
        print(f"training on {data.train.num_samples} images, {num_classes} classes, {dist.world_size} "
              f"process(es) on {device}, {precision}; {steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
              f"run directory {run_dir}", file=sys.stderr)

    def checkpoint(tag: str, *, epoch: int, batch: int) -> None:
        """Write RUN/last (with the training state) or RUN/best; every process takes part."""
        full_model = _gathered_model(raw, wrapped, dist)
        optim_state = _optimizer_state(wrapped, optimizer, dist) if tag == "last" else None
        rng_states = _gathered_rng(device, dist) if tag == "last" else None
        if dist.main:
            if tag == "best" and ema is not None:
                full_model = ema.model
            state = None
            if tag == "last":
                # Wall time so far, kept with the checkpoint: a resumed run's summary counts all of it.
                progress["wall_time"] = wall_before + time.perf_counter() - start_time
                state = {"optimizer": optim_state, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                         "ema": ema.model.state_dict() if ema else None,
                         # "rng" (rank 0's) is what checkpoints had before per-rank streams.
                         "rng": rng_states[0], "rng_ranks": rng_states,
                         "progress": {**progress, "epoch": epoch, "batch": batch}}
            save_checkpoint(run_dir, tag=tag, model=full_model, train_state=state)
        _barrier(dist)

    start_time, wall_before = time.perf_counter(), float(progress.get("wall_time", 0.0))
    epoch_start, batch_start = progress["epoch"], progress["batch"]
    step = progress["step"]
    # Reading a value back from the GPU waits for every step queued before it, and the GPU then
    # idles while the CPU queues the next one: the loss, accuracy and NaN check of the steps are
    # read in one go every `read_back_every` steps, always before a checkpoint and at the end of
    # an epoch, so a diverged run never overwrites its last good checkpoint. On the CPU reading
    # costs nothing and happens every step.
    read_back_every = _read_back_every(device)
    unread: list[dict[str, Any]] = []  # steps taken whose numbers are still on the device
    window_start = start_time

    def read_back() -> None:
        nonlocal window_start
        if not unread:
            return
        # One read for the window, record by record: micro-batch losses, the epoch's running sums
        # (loss, correct, count), and under fp16 whether the scaler skipped the step.
        pieces = []
        for record in unread:
            pieces += [loss for loss, _ in record["losses"]] + list(record["sums"])
            if record["skipped"] is not None:
                pieces.append(record["skipped"].double())
        values = iter(torch.stack(pieces).tolist())
        now = time.perf_counter()  # after the read: every step of the window has finished
        images = sum(record["images"] for record in unread)
        img_s = images / max(now - window_start, 1e-9)
        progress["images"] += images
        progress["train_time"] += now - window_start
        window_start = now
        for record in unread:
            group = [(next(values), batch) for _, batch in record["losses"]]
            _, correct, count = next(values), next(values), next(values)
            if record["skipped"] is not None:
                progress["skipped_steps"] += int(next(values))
            for value, batch in group:
                if not math.isfinite(value):
                    raise TrainingDiverged(_diverged_message(value, record["step"], record["epoch"], batch, run_dir,
                                                             precision, cfg.clip_grad), step=record["step"])
            loss = sum(value / len(group) for value, _ in group)
            acc = correct / max(count, 1.0)
            log.write({"kind": "step", "step": record["step"] + 1, "epoch": record["epoch"],
                       "batch": record["batch"] + 1, "loss": loss, "train_acc": acc, "lr": record["lr"],
                       "img_s": img_s, "skipped_steps": progress["skipped_steps"]})
        skipped = progress["skipped_steps"]
        bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.3f} {img_s:.0f} img/s" + (f" skipped {skipped}" if skipped else ""))
        unread.clear()

    try:
        for epoch in range(epoch_start, cfg.epochs):
            train_model.train()
            num_batches = len(data.train)
            bar = _bar(total=num_batches, initial=batch_start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       enabled=dist.main and cfg.progress)
            # Loss, correct, count of this epoch so far (a run resumed mid-epoch brings its own).
            sums = torch.tensor(progress.get("epoch_sums", [0.0] * 3) if batch_start else [0.0] * 3,
                                device=device, dtype=torch.float64)
            group_losses, window_start = [], time.perf_counter()
            for batch, (images, labels) in enumerate(data.train.iterate(epoch, start_batch=batch_start),
                                                     start=batch_start):
                group_start = (batch // cfg.grad_accum) * cfg.grad_accum
                group_size = min(cfg.grad_accum, num_batches - group_start)
                last_in_group = batch == group_start + group_size - 1
                if batch == group_start:
                    lr = lr_at(step, base_lr=cfg.lr, warmup_steps=warmup_steps, total_steps=total_steps,
                               min_lr=cfg.min_lr)
                    set_lr(optimizer, lr)
                images, targets = mix_batch(images, labels, num_classes=num_classes, mixup_alpha=cfg.mixup,
                                            cutmix_alpha=cfg.cutmix, smoothing=cfg.label_smoothing,
                                            seed=cfg.seed, step=epoch * num_batches + batch, rank=dist.rank)
                sync = contextlib.nullcontext()
                if not last_in_group and hasattr(wrapped, "no_sync"):
                    sync = wrapped.no_sync()  # DDP: all-reduce gradients once per optimiser step
                if hasattr(wrapped, "set_requires_gradient_sync"):
                    wrapped.set_requires_gradient_sync(last_in_group)  # FSDP2: reduce-scatter once per step
                with sync:
                    with _autocast(device, precision):
                        loss, logits = compute_loss(train_model, images, targets, labels, teacher=teacher, config=cfg)
                    scaler.scale(loss / group_size).backward()
                # torch.full, not torch.tensor: a copy from the host would wait for the GPU.
                stats = torch.stack([loss.detach().double(), (logits.argmax(-1) == labels).sum().double(),
                                     torch.full((), labels.numel(), dtype=torch.float64, device=device)])
                stats[0] = _all_mean(stats[0:1].clone(), dist)[0]
                stats[1:] = _all_sum(stats[1:].clone(), dist)
                sums += torch.stack([stats[0] * stats[2], stats[1], stats[2]])
                group_losses.append((stats[0], batch))
                if not last_in_group:
                    continue
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    _clip_gradients(wrapped, cfg.clip_grad)
                # The scale as a tensor: get_scale() would read it back, waiting for the GPU.
                scale_before = scaler._get_scale_async().clone() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                skipped = None if scale_before is None else scaler._get_scale_async() < scale_before
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(raw)
                unread.append({"step": step, "epoch": epoch, "batch": batch, "lr": lr, "losses": group_losses,
                               "sums": sums.clone(), "images": labels.numel() * dist.world_size * group_size,
                               "skipped": skipped})
                group_losses = []
                step += 1
                progress["step"] = step
                bar.update(group_size)
                checkpoint_now = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch + 1 < num_batches
                if checkpoint_now or len(unread) >= read_back_every or batch + 1 == num_batches:
                    read_back()
                if checkpoint_now:
                    progress["epoch_sums"] = sums.tolist()
                    checkpoint("last", epoch=epoch, batch=batch + 1)
                    window_start = time.perf_counter()  # saving is not training time
            bar.close()
            batch_start = 0
            eval_model = ema.model if ema is not None else wrapped
            val_loss, val_acc = evaluate(eval_model, data.val, device=device, precision=precision, dist=dist)
            train_loss = (sums[0] / sums[2].clamp(min=1)).item()
            train_acc = (sums[1] / sums[2].clamp(min=1)).item()
            record = {"kind": "epoch", "step": step, "epoch": epoch + 1, "train_loss": train_loss,
                      "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                      "elapsed_s": progress["train_time"], "skipped_steps": progress["skipped_steps"]}
            log.write(record)
            improved = val_acc > progress["best_acc"]
            if improved:
                progress["best_acc"], progress["best_epoch"] = val_acc, epoch + 1
            if dist.main:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}, "
                      f"val loss {val_loss:.4f} acc {val_acc:.4f}" + (" (best)" if improved else ""), file=sys.stderr)
            if improved:
                checkpoint("best", epoch=epoch + 1, batch=0)
            checkpoint("last", epoch=epoch + 1, batch=0)
            if dist.main:
                _plot(run_dir)
    except TrainingDiverged as error:
        log.write({"kind": "event", "step": error.step, "event": "diverged"})
        raise
    finally:
        log.close()

    wall = wall_before + time.perf_counter() - start_time
    summary = {
        "run_dir": str(run_dir), "model": cfg.model or cfg.init, "epochs": cfg.epochs, "steps": step,
        "best_val_acc": progress["best_acc"], "best_epoch": progress["best_epoch"],
        "final_val_acc": _last_epoch_value(run_dir, "val_acc") if dist.main else None,
        "wall_time_s": wall, "train_time_s": progress["train_time"],
        "images_per_s": progress["images"] / max(progress["train_time"], 1e-9),
        "skipped_steps": progress["skipped_steps"], "device": str(device), "precision": precision,
        "world_size": dist.world_size, "train_images": data.train.num_samples, "num_classes": num_classes,
        "skipped_images": len(data.skipped),
    }
    if dist.main:
        _write_json(run_dir / SUMMARY_FILE, summary)
        print(f"best val acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}); "
              f"{wall:.0f} s, {summary['images_per_s']:.0f} img/s; run directory {run_dir}", file=sys.stderr)
    return summary


# ---------------------------------------------------------------------------- helpers of the loop
def _bar(*, total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, leave=False)


def _clip_gradients(model: nn.Module, max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _read_back_every(device: torch.device) -> int:
    """Optimiser steps between reads of the training numbers from `device` (see the loop)."""
    return 1 if device.type == "cpu" else 16


def _diverged_message(value: float, step: int, epoch: int, batch: int, run_dir: Path, precision: str,
                      clip_grad: float | None) -> str:
    kept = f"the last good checkpoint {run_dir / 'last'} is kept" if (run_dir / "last").exists() \
        else "no checkpoint had been written yet"
    remedy = "a lower --lr" + (", --clip-grad 1.0" if clip_grad is None else "")
    remedy += ", or --precision bf16 instead of fp16" if precision == "fp16" else ", or a longer --warmup-epochs"
    return (f"the loss became {value} at step {step + 1} (epoch {epoch + 1}, batch {batch + 1}); {kept}; "
            f"try {remedy}")


def _last_epoch_value(run_dir: Path, key: str) -> float | None:
    epochs = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("kind") == "epoch"]
    return epochs[-1][key] if epochs else None


def _plot(run_dir: Path) -> None:
    from .plots import plot_run

    try:
        plot_run(run_dir)
    except ImportError as error:
        print(f"vitkit train: no plots ({error})", file=sys.stderr)


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The global RNG's seed for `rank` (> 0) of a run, or for a rank that resumes at `step`
    without a saved stream of its own."""
    import numpy as np

    words = np.random.SeedSequence([seed % (1 << 64), rank, step]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def _gathered_rng(device: torch.device, dist: _Dist) -> list[dict[str, Any]] | None:
    """Every rank's RNG state, indexed by rank, on rank 0 (None on the others)."""
    own = rng_state(device)
    if dist.world_size == 1:
        return [own]
    import torch.distributed as tdist

    # One tensor all_gather of the states' bytes (the same size on every rank), not the
    # pickling gather_object: with that, gloo sometimes aborted a process at exit.
    parts = [own["torch"]] + ([own["cuda"]] if "cuda" in own else [])
    flat = torch.cat(parts).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, flat)
    if not dist.main:
        return None
    sizes = [p.numel() for p in parts]
    states = []
    for rank_bytes in gathered:
        split = [part.clone() for part in rank_bytes.cpu().split(sizes)]  # own storage each, as saved
        states.append({"torch": split[0], **({"cuda": split[1]} if len(split) > 1 else {})})
    return states


def _resume_rng(state: dict[str, Any], *, seed: int, rank: int, step: int, device: torch.device) -> None:
    """Continue this rank's own stream; a rank the checkpoint has none for (a checkpoint older
    than per-rank streams, or a run resumed on more processes) starts a fresh one keyed by
    (seed, rank, step): taking rank 0's would give it rank 0's masks."""
    saved = state.get("rng_ranks") or [state["rng"]]
    if rank < len(saved):
        restore_rng(saved[rank], device)
    else:
        torch.manual_seed(_rank_seed(seed, rank, step))


def _use_fp8(model: nn.Module, *, device: torch.device, main: bool) -> None:
    """The blocks' linear layers as FP8 matmuls, in place (before the EMA copy and the wrappers,
    so the EMA and validation run in FP8 too); the saved weights are the ordinary ones."""
    from .fp8 import convert_to_fp8

    try:
        converted = convert_to_fp8(model)
    except ValueError as error:
        raise VitkitError(f"--fp8: {error}") from None
    total = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    if main and converted < total:
        print(f"warning: --fp8: {converted} of the blocks' {total} linear layers run in FP8; the others have "
              "widths not divisible by 16", file=sys.stderr)
    if main and device.type == "cpu":
        print("warning: --fp8 on the CPU: the same rounding as on a GPU, but slower than without --fp8 "
              "(FP8 is made for the FP8 tensor cores of GPUs)", file=sys.stderr)


def _share_batch_norm(model: nn.Module, *, device: torch.device, main: bool) -> None:
    """A conv stem's BatchNorm across processes: synchronised on GPUs, so its statistics are the
    global batch's as in a one-process run; gloo on CPU has no SyncBatchNorm, so say it differs."""
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BatchNorm layers in place
    elif main:
        print("note: on CPU each process normalises the conv stem's BatchNorm over its own share of the batch "
              "(gloo has no SyncBatchNorm), so the run differs slightly from a one-process run; on GPUs "
              "it is synchronised", file=sys.stderr)


def _load_resumed_weights(model: VisionTransformer, run_dir: Path, cfg: TrainConfig) -> None:
    from .pretrained import WEIGHTS_FILE, load_state
    from .weights import read_state_dict

    path = run_dir / "last" / WEIGHTS_FILE
    try:
        load_state(model, read_state_dict(path), source=str(path))
    except CheckpointError as error:
        raise VitkitError(f"--resume {run_dir}: its checkpoint does not fit the model "
                          f"{cfg.model or cfg.init!r} ({error})") from None


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _gathered_model(raw: VisionTransformer, wrapped: nn.Module, dist: _Dist) -> VisionTransformer:
    """A plain model holding full weights, for saving: under FSDP the shards are gathered."""
    if dist.world_size == 1 or isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return raw
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(wrapped, options=_state_options())
    if not dist.main:
        return raw
    copy = VisionTransformer(raw.config)
    copy.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
    copy.class_names, copy.preprocessing = raw.class_names, raw.preprocessing
    return copy


def _optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, dist: _Dist) -> dict[str, Any]:
    """The optimiser's state keyed by parameter name, gathered whole, so any process count resumes it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    return get_optimizer_state_dict(module, optimizer, options=_state_options())


def _restore_optimizer(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                       dist: _Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


__all__ = ["TrainConfig", "train", "resolve_config", "evaluate", "compute_loss", "soft_cross_entropy",
           "read_metrics", "write_metrics", "TrainingDiverged"]
