"""CIFAR-10 time to accuracy: train a small ViT from scratch on the full training set and report
the test accuracy after every epoch against the training wall time.

    PYTHONPATH=src python benchmarks/cifar10.py --model vit_cifar_conv --time-budget 55
    PYTHONPATH=src python benchmarks/cifar10.py --model vit_cifar_conv --time-budget 280 --drop-path 0.1

Results (command, device, date, per-epoch accuracy and time) are in benchmarks/RESULTS.md under
"CIFAR-10 time to accuracy"; what was tried and why is in benchmarks/NOTES-cifar10.md.

What makes it fast: the 60,000 JPEGs are decoded once and kept on the GPU as uint8; random crop
(4 px reflect padding) and horizontal flip run on the GPU as one gather; large batches in bf16
autocast; torch.compile; channels-last convolutions in the stem; fused AdamW; the loss is read back
once an epoch, not every step. Compilation happens in a warm-up on throwaway steps (the weights and
optimizer are reset afterwards), so the reported time is training time, as airbench reports it.

`--time-budget S` fits the number of epochs to S seconds of training, from the measured step time
of the warm-up, so the learning-rate schedule always ends at zero inside the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vitkit
from vitkit.images import decode_image

# CIFAR-10's channel statistics (of the training set, in [0, 1]).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # random-crop padding, the standard CIFAR augmentation (He et al., 2016)
DEFAULT_ARCHIVES = ("../shared/data/cifar10-jpeg.tar.gz", ".data/cifar10-jpeg.tar.gz")


# ---------------------------------------------------------------------------- data
def _decode_chunk(items: list[tuple[str, bytes]]) -> np.ndarray:
    return np.stack([np.asarray(decode_image(data, name=name)) for name, data in items])  # (n, 32, 32, 3)


@dataclass
class Cifar:
    train_x: np.ndarray  # (N, 32, 32, 3) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def load_cifar10(*, archive: Path, limit_per_class: int | None = None, workers: int = 1) -> Cifar:
    """Decode the ImageFolder archive (train/<class>/*.jpg, test/<class>/*.jpg) into memory."""
    members: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(archive) as tar:
        for info in tar:
            parts = info.name.split("/")
            if not info.isfile() or len(parts) != 3 or parts[0] not in members:
                continue
            members[parts[0]].append((parts[1], info.name, tar.extractfile(info).read()))
    classes = sorted({cls for cls, _, _ in members["train"]})
    if len(classes) != 10:
        raise SystemExit(f"{archive}: expected 10 class folders under train/, found {classes}")
    arrays = {}
    for split, items in members.items():
        items.sort(key=lambda item: item[1])
        if limit_per_class:
            counts: dict[str, int] = {}
            kept = []
            for item in items:
                counts[item[0]] = counts.get(item[0], 0) + 1
                if counts[item[0]] <= limit_per_class:
                    kept.append(item)
            items = kept
        labels = np.array([classes.index(cls) for cls, _, _ in items], dtype=np.int64)
        pairs = [(name, data) for _, name, data in items]
        chunks = [pairs[i:i + 2000] for i in range(0, len(pairs), 2000)]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                images = np.concatenate(list(pool.map(_decode_chunk, chunks)))
        else:
            images = np.concatenate([_decode_chunk(c) for c in chunks])
        arrays[split] = (images, labels)
    return Cifar(*arrays["train"], *arrays["test"], classes=classes)


class GpuData:
    """The whole data set on the device as uint8; batches are augmented and normalised there."""

    def __init__(self, data: Cifar, *, device: torch.device) -> None:
        train = torch.from_numpy(data.train_x).to(device)  # (N, 32, 32, 3) uint8
        # Reflect-pad once, so a random crop is a gather of 32x32 windows from 40x40 images.
        self.train = F.pad(train.permute(0, 3, 1, 2).float(), (PAD,) * 4, mode="reflect") \
            .to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, 40, 40, 3)
        self.train_y = torch.from_numpy(data.train_y).to(device)
        self.test = torch.from_numpy(data.test_x).to(device)  # (M, 32, 32, 3)
        self.test_y = torch.from_numpy(data.test_y).to(device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.arange = torch.arange(32, device=device)
        self.device = device

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float, channels-last in memory (the stem's best layout)."""
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std

    def train_batches(self, *, batch_size: int, generator: torch.Generator):
        """One epoch of augmented batches; the last partial batch is dropped (fixed shapes for compile)."""
        n = self.train.shape[0]
        order = torch.randperm(n, device=self.device, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            offsets = torch.randint(0, 2 * PAD + 1, (2, batch_size), device=self.device, generator=generator)
            rows = offsets[0, :, None] + self.arange  # (B, 32)
            cols = offsets[1, :, None] + self.arange  # (B, 32)
            flip = torch.rand(batch_size, device=self.device, generator=generator) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
            images = self.train[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, 32, 32, 3)
            yield self.normalise(images), self.train_y[idx]


# ---------------------------------------------------------------------------- training
@dataclass
class Recipe:
    model: str = "vit_cifar_conv"
    epochs: int = 30
    time_budget: float | None = None  # seconds of training; sets epochs from the measured step time
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    tta: bool = True  # average the logits of the image and its mirror image at test time
    compile: bool = True
    seed: int = 0
    overrides: dict = field(default_factory=dict)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay only matrices and conv kernels; norms, biases, tokens and position embeddings are
    # left alone, as in DeiT and timm.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "pos_embed" not in name and "token" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to zero (one-cycle shape: best at short budgets)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: GpuData, *, tta: bool, batch_size: int = 2000) -> float:
    """Top-1 test accuracy in [0, 1]."""
    model.eval()
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    for start in range(0, data.test.shape[0], batch_size):
        x = data.normalise(data.test[start:start + batch_size])
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=data.device.type == "cuda"):
            logits = model(x).float()
            if tta:
                logits = logits + model(x.flip(3)).float()
        correct += (logits.argmax(1) == data.test_y[start:start + batch_size]).sum()
    model.train()
    return correct.item() / data.test.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_to_accuracy(*, data: GpuData, recipe: Recipe, log=print) -> dict:
    """Train `recipe.model` from scratch; return the recipe, model size and per-epoch history."""
    device = data.device
    torch.manual_seed(recipe.seed)
    model = vitkit.create_model(recipe.model, drop_path_rate=recipe.drop_path, **recipe.overrides).to(device)
    model = model.to(memory_format=torch.channels_last)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    forward = torch.compile(model) if recipe.compile else model
    steps_per_epoch = data.train.shape[0] // recipe.batch_size
    generator = torch.Generator(device=device).manual_seed(recipe.seed)

    def make_optimizer():
        return torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999),
                                 fused=device.type == "cuda")

    def step(optimizer, x, y, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(forward(x), y, label_smoothing=recipe.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # Warm-up: compile the train and eval graphs and measure the step time, then reset everything.
    t0 = time.perf_counter()
    optimizer = make_optimizer()
    warm_steps, timed_steps = (5, 20) if device.type == "cuda" else (1, 2)
    batches = (batch for _ in range(warm_steps + timed_steps)
               for batch in data.train_batches(batch_size=recipe.batch_size, generator=generator))
    for i in range(warm_steps + timed_steps):
        if i == warm_steps:
            _sync(device)
            t_steps = time.perf_counter()
        step(optimizer, *next(batches), recipe.lr * 1e-3)
    _sync(device)
    step_s = (time.perf_counter() - t_steps) / timed_steps
    evaluate(forward, data, tta=recipe.tta)
    warmup_s = time.perf_counter() - t0
    epochs = recipe.epochs
    if recipe.time_budget:
        epochs = max(1, int(recipe.time_budget / (step_s * steps_per_epoch * 1.05)))
    log(f"# {recipe.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; warm-up/compile "
        f"{warmup_s:.1f}s; {step_s * 1e3:.1f} ms/step x {steps_per_epoch} steps -> {epochs} epochs")

    model.load_state_dict(initial)
    optimizer = make_optimizer()
    generator.manual_seed(recipe.seed)
    total = epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    history, train_s, global_step = [], 0.0, 0
    for epoch in range(epochs):
        _sync(device)
        t_epoch = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y in data.train_batches(batch_size=recipe.batch_size, generator=generator):
            loss_sum += step(optimizer, x, y, recipe.lr * _lr_factor(global_step, warmup=warmup, total=total))
            global_step += 1
        _sync(device)
        train_s += time.perf_counter() - t_epoch
        accuracy = evaluate(forward, data, tta=recipe.tta)
        row = {"epoch": epoch + 1, "train_s": round(train_s, 2), "test_acc": round(accuracy, 4),
               "train_loss": round(loss_sum.item() / steps_per_epoch, 4)}
        history.append(row)
        log(f"epoch {row['epoch']:3d}  train {row['train_s']:7.2f}s  loss {row['train_loss']:.4f}  "
            f"test {100 * accuracy:5.2f}%")
    return {"recipe": asdict(recipe), "epochs": epochs, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "warmup_compile_s": round(warmup_s, 1), "step_ms": round(step_s * 1e3, 2), "history": history,
            "final_acc": history[-1]["test_acc"], "train_s": history[-1]["train_s"],
            "time_to": {str(goal): next((r["train_s"] for r in history if r["test_acc"] >= goal), None)
                        for goal in (0.80, 0.90, 0.93, 0.94)}}


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Recipe()
    p.add_argument("--data", type=Path, help="cifar10-jpeg.tar.gz (default: ../shared/data or .data)")
    p.add_argument("--model", default=d.model, help="a registered model name (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--time-budget", type=float, help="seconds of training; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--drop-path", type=float, default=d.drop_path)
    p.add_argument("--no-tta", action="store_true", help="no test-time flip averaging")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="ViTConfig override, e.g. --set depth=4 --set 'hybrid_stem={...}'")
    p.add_argument("--limit-per-class", type=int, help="use only this many images per class (CPU smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    archive = args.data or next((Path(a) for a in DEFAULT_ARCHIVES if Path(a).is_file()), None)
    if archive is None or not archive.is_file():
        raise SystemExit(f"CIFAR-10 archive not found (tried {args.data or DEFAULT_ARCHIVES})")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    recipe = Recipe(model=args.model, epochs=args.epochs, time_budget=args.time_budget, batch_size=args.batch_size,
                    lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                    label_smoothing=args.label_smoothing, drop_path=args.drop_path, tta=not args.no_tta,
                    compile=not args.no_compile, seed=args.seed, overrides=overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    cifar = load_cifar10(archive=archive, limit_per_class=args.limit_per_class, workers=min(16, os.cpu_count() or 1))
    data = GpuData(cifar, device=device)
    print(f"# data: {len(cifar.train_y)} train / {len(cifar.test_y)} test images decoded and on {device} "
          f"in {time.perf_counter() - t0:.1f}s; device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}", flush=True)
    result = train_to_accuracy(data=data, recipe=recipe, log=lambda s: print(s, flush=True))
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["torch"] = torch.__version__
    print(f"# final {100 * result['final_acc']:.2f}% after {result['epochs']} epochs, {result['train_s']:.1f}s of "
          f"training; time to 90%: {result['time_to']['0.9']}s, to 94%: {result['time_to']['0.94']}s")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
