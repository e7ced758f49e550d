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
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import save_checkpoint
from ..errors import VitkitError
from ..mixup import mix_batch
from ..optim import build_optimizer, lr_at, set_lr
from .config import TrainConfig
from .distributed import (Dist, all_mean, all_sum, barrier, device_for, gathered_model, gathered_rng,
                          init_distributed, optimizer_state, rank_seed, restore_optimizer, resume_rng)
from .run_dir import (METRICS_FILE, RUN_CONFIG, SUMMARY_FILE, MetricsLog, last_epoch_value, prepare_run, write_json,
                      write_plots)
from .setup import Distilled, Ema, build_model, load_init, model_for_run, teacher_for_run, wrap_for_processes


class TrainingDiverged(VitkitError):
    """The loss became NaN or infinite at optimiser step `step` (0-based); the last good
    checkpoint is kept."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against soft targets (B, K): label smoothing and mixup in one form."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def compute_loss(model: nn.Module, images: Tensor, targets: Tensor, labels: Tensor, *,
                 teacher: nn.Module | None, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """The training loss of one batch and the logits that accuracy is measured on."""
    if teacher is None:
        logits = model(images)
        return soft_cross_entropy(logits, targets), logits
    from ..distill import distillation_loss

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
def evaluate(model: nn.Module, loader, *, device: torch.device, precision: str, dist: Dist) -> tuple[float, float]:
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
    totals = all_sum(totals, dist)
    model.train(was_training)
    count = max(totals[2].item(), 1.0)
    return totals[0].item() / count, totals[1].item() / count


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a ViT as `config` says; write the run directory; return the summary (also in
    RUN/summary.json): best and final validation accuracy, wall time, images per second.

    Raises VitkitError (one line) for bad inputs, a diverging loss (TrainingDiverged), running
    out of GPU memory, or a checkpoint that cannot be saved.
    """
    dist = init_distributed(config.device)
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
            import gc

            import torch.distributed as tdist

            # DDP's reducer and FSDP's state sit in reference cycles that hold the process group;
            # left to the collector at interpreter exit, a gloo process sometimes aborted there
            # ("terminate called without an active exception": 4 of 60 two-process runs; 0 of 120 with this).
            gc.collect()
            if tdist.is_initialized():
                tdist.destroy_process_group()


def _train(config: TrainConfig, dist: Dist) -> dict[str, Any]:
    from ..data import build_data

    cfg, run_dir, resume_state = prepare_run(config)
    if dist.world_size > 1:
        import torch.distributed as tdist

        # The default directory name holds a timestamp: every process takes rank 0's. The barrier
        # keeps rank 0 from writing into it before the others have checked --out is free.
        name = [str(run_dir)]
        tdist.broadcast_object_list(name, src=0)
        run_dir = Path(name[0])
        cfg.out = cfg.out if cfg.resume else name[0]
        barrier(dist)
    device = device_for(cfg, dist)
    precision = cfg.precision or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    if cfg.batch_size % dist.world_size:
        raise VitkitError(f"--batch-size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    torch.manual_seed(cfg.seed)  # the same initial weights on every process

    build = cfg  # what the model is built from; cfg itself (saved in config.json) keeps --init as given
    if resume_state is not None and cfg.init:
        # The run's own checkpoint holds everything --init gave it (weights, head, tokens): resuming
        # must not need the original source again (deleted, moved, or on the Hub while offline).
        build = dataclasses.replace(cfg, init=str(run_dir / "last"))
    init_model = load_init(build)
    init_pre = init_model.preprocessing if init_model is not None else None
    img_size = cfg.img_size
    if img_size is None and init_model is not None:
        img_size = init_model.config.img_size
    elif img_size is None:
        img_size = build_model(dataclasses.replace(build, distill_from=None), num_classes=1).config.img_size
    data = build_data(cfg.data, img_size=img_size, batch_size=cfg.batch_size // dist.world_size, device=device,
                      augment=cfg.augment, random_erasing=cfg.random_erasing, workers=cfg.workers, seed=cfg.seed,
                      rank=dist.rank, world_size=dist.world_size, strict=cfg.strict, max_train=cfg.max_train,
                      mean=init_pre.mean if init_pre else None, std=init_pre.std if init_pre else None,
                      interpolation=init_pre.interpolation if init_pre else None)
    num_classes = len(data.class_names)
    torch.manual_seed(cfg.seed)
    raw = model_for_run(cfg, build, init_model, data=data, resume_state=resume_state, run_dir=run_dir,
                        device=device, dist=dist)
    del init_model  # raw is it, fitted, when --init gave one
    ema = Ema(raw, cfg.ema) if cfg.ema else None
    if ema is not None and resume_state is not None and resume_state.get("ema") is not None:
        ema.model.load_state_dict(resume_state["ema"])

    wrapped = wrap_for_processes(Distilled(raw) if cfg.distill_from else raw, raw=raw, fsdp=cfg.fsdp, device=device,
                                 dist=dist)
    optimizer = build_optimizer(raw, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                depth=raw.config.depth)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    teacher = teacher_for_run(cfg, data=data, device=device) if cfg.distill_from else None
    train_model = torch.compile(wrapped) if cfg.compile else wrapped

    steps_per_epoch = math.ceil(len(data.train) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch)  # a warm-up past the end is all warm-up
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_acc": -1.0, "best_epoch": -1, "skipped_steps": 0,
                "train_time": 0.0, "images": 0}
    if resume_state is not None:
        restore_optimizer(wrapped, optimizer, resume_state["optimizer"], dist)
        scaler.load_state_dict(resume_state["scaler"]) if resume_state.get("scaler") else None
        progress.update(resume_state["progress"])
        resume_rng(resume_state, seed=cfg.seed, rank=dist.rank, step=progress["step"], device=device)
    elif dist.rank > 0:
        # The weights are built, identical everywhere; from here each rank draws its own dropout
        # and stochastic-depth masks. Rank 0 keeps the stream of a one-process run.
        torch.manual_seed(rank_seed(cfg.seed, dist.rank))

    if dist.main:
        # Made once the data, model and teacher are known to work: a run that fails to start
        # leaves no directory (nor a config.json claiming it) behind.
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_CONFIG, {**cfg.to_dict(), "precision": precision})
    log = MetricsLog(run_dir / METRICS_FILE, keep_until_step=progress["step"] if cfg.resume else None,
                      enabled=dist.main)
    if dist.main:
        from ..info import describe

        print(describe(raw), file=sys.stderr)
        print(f"training on {data.train.num_samples} images, {num_classes} classes, {dist.world_size} "
              f"process(es) on {device}, {precision}; {steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
              f"run directory {run_dir}", file=sys.stderr)

    def checkpoint(tag: str, *, epoch: int, batch: int) -> None:
        """Write RUN/last (with the training state) or RUN/best; every process takes part."""
        full_model = gathered_model(raw, wrapped, dist)
        optim_state = optimizer_state(wrapped, optimizer, dist) if tag == "last" else None
        rng_states = gathered_rng(device, dist) if tag == "last" else None
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
        barrier(dist)

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
                stats[0] = all_mean(stats[0:1].clone(), dist)[0]
                stats[1:] = all_sum(stats[1:].clone(), dist)
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
                write_plots(run_dir)
    except TrainingDiverged as error:
        log.write({"kind": "event", "step": error.step, "event": "diverged"})
        raise
    finally:
        log.close()

    wall = wall_before + time.perf_counter() - start_time
    summary = {
        "run_dir": str(run_dir), "model": cfg.model or cfg.init, "epochs": cfg.epochs, "steps": step,
        "best_val_acc": progress["best_acc"], "best_epoch": progress["best_epoch"],
        "final_val_acc": last_epoch_value(run_dir, "val_acc") if dist.main else None,
        "wall_time_s": wall, "train_time_s": progress["train_time"],
        "images_per_s": progress["images"] / max(progress["train_time"], 1e-9),
        "skipped_steps": progress["skipped_steps"], "device": str(device), "precision": precision,
        "world_size": dist.world_size, "train_images": data.train.num_samples, "num_classes": num_classes,
        "skipped_images": len(data.skipped),
    }
    if dist.main:
        write_json(run_dir / SUMMARY_FILE, summary)
        print(f"best val acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}); "
              f"{wall:.0f} s, {summary['images_per_s']:.0f} img/s; run directory {run_dir}", file=sys.stderr)
    return summary


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


