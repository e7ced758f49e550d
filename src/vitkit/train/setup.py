"""What a run trains: the model (built, or read from --init and fitted to the flags), its
EMA, the wrappers the processes train it through (DeiT's two heads, DDP or FSDP2), and the teacher."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import DataBundle
from ..errors import CheckpointError, VitkitError
from ..images import require_rgb
from ..model import VisionTransformer
from .config import TrainConfig
from .distributed import Dist


def load_init(config: TrainConfig) -> VisionTransformer | None:
    """The --init model, read once: its weights, and its preprocessing (normalisation and
    interpolation carry over to the data; a model name's published ones, as load_pretrained gives)."""
    if not config.init:
        return None
    import warnings

    from ..pretrained import load_pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replaced head is intended, not news
        try:
            return load_pretrained(config.init, model=config.model, drop_path_rate=config.drop_path)
        except VitkitError as error:
            raise VitkitError(f"--init: {error}") from None


def build_model(config: TrainConfig, *, num_classes: int, class_names: list[str] | None = None,
                 init_model: VisionTransformer | None = None) -> VisionTransformer:
    """The model `config` names, or with --init its `init_model` (read here if not given) fitted to
    the flags: a new head for new classes, the image size, a distillation token."""
    from ..pretrained import create_model, set_img_size

    overrides: dict[str, Any] = dict(config.model_overrides or {})
    overrides["drop_path_rate"] = config.drop_path
    if config.distill_from:
        overrides["distill_token"] = True
    if config.init:
        model = init_model if init_model is not None else load_init(config)
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
            from ..distill import add_distillation_token

            try:
                model = add_distillation_token(model)
            except VitkitError as error:
                raise VitkitError(f"--init {config.init} with --distill-from: {error}") from None
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


class Distilled(nn.Module):
    """Lets DDP/FSDP wrap the two-headed forward DeiT trains with."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        if not self.training:  # evaluation: the two heads vote, as the plain forward does
            return self.model(x)
        return self.model.forward_distilled(x)


class Ema:
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


def model_for_run(cfg: TrainConfig, build: TrainConfig, init_model: VisionTransformer | None, *,
                  data: DataBundle, resume_state: dict[str, Any] | None, run_dir: Path, device: torch.device,
                  dist: Dist) -> VisionTransformer:
    """The model to train, on `device`: built from `build` (or resumed), checked against the
    flags, labelled with the data's classes and preprocessing, with the run's options applied."""
    num_classes = len(data.class_names)
    raw = build_model(build, num_classes=num_classes, class_names=list(data.class_names), init_model=init_model)
    require_rgb(raw, what="train")
    if cfg.init and cfg.model and resume_state is None:
        from ..pretrained import check_named_model

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
    return raw


def wrap_for_processes(module: nn.Module, *, raw: VisionTransformer, fsdp: bool, device: torch.device,
                       dist: Dist) -> nn.Module:
    """`module` as the processes train it: sharded per block (FSDP2), replicated (DDP), or as it is."""
    if dist.world_size > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in raw.blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def teacher_for_run(cfg: TrainConfig, *, data: DataBundle, device: torch.device) -> nn.Module:
    """The --distill-from teacher, frozen on `device`, checked against the data's classes."""
    from ..distill import check_teacher_classes, load_teacher

    try:
        teacher = load_teacher(cfg.distill_from, num_classes=len(data.class_names), device=device,
                               input_preprocessing=data.preprocessing)
    except VitkitError as error:
        raise VitkitError(error if str(error).startswith("--distill-from") else f"--distill-from: {error}") from None
    check_teacher_classes(teacher, list(data.class_names), source=f"--distill-from {cfg.distill_from}")
    return teacher


def _use_fp8(model: nn.Module, *, device: torch.device, main: bool) -> None:
    """The blocks' linear layers as FP8 matmuls, in place (before the EMA copy and the wrappers,
    so the EMA and validation run in FP8 too); the saved weights are the ordinary ones."""
    from ..fp8 import convert_to_fp8

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
    from ..pretrained import WEIGHTS_FILE, load_state
    from ..weights import read_state_dict

    path = run_dir / "last" / WEIGHTS_FILE
    try:
        load_state(model, read_state_dict(path), source=str(path))
    except CheckpointError as error:
        raise VitkitError(f"--resume {run_dir}: its checkpoint does not fit the model "
                          f"{cfg.model or cfg.init!r} ({error})") from None
