"""Masked autoencoder pre-training (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners").

No labels: hide 75% of each image's patches at random, run the ViT encoder on the visible quarter
only, and let a small transformer decoder paint the hidden patches back. The loss is the mean
squared error on the hidden patches, each patch's pixels normalised by its own mean and variance
(MAE Sec. 3, "normalized pixels", their best target). After pre-training the decoder is thrown
away and the encoder, a plain `VisionTransformer`, is fine-tuned (`vitkit train --init RUN`).

    vitkit pretrain --method mae --model vit_cifar --epochs 100 --out runs/mae   # default data: the sample
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ViTConfig
from .errors import VitkitError
from .layers import Block
from .model import VisionTransformer
from .weights import atomic_write


def patchify(images: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, N, P*Q*C): each patch's pixels, patches in PatchEmbed's raster order."""
    B, C, H, W = images.shape
    P, Q = patch_size
    x = images.reshape(B, C, H // P, P, W // Q, Q)  # (B, C, h, P, w, Q)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, Q, C)
    return x.reshape(B, (H // P) * (W // Q), P * Q * C)


def unpatchify(patches: Tensor, patch_size: tuple[int, int], grid: tuple[int, int], channels: int = 3) -> Tensor:
    """The inverse of `patchify`: (B, N, P*Q*C) -> (B, C, H, W)."""
    B = patches.shape[0]
    (P, Q), (h, w) = patch_size, grid
    x = patches.reshape(B, h, w, P, Q, channels)  # (B, h, w, P, Q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, P, w, Q)
    return x.reshape(B, channels, h * P, w * Q)


def random_masking(batch: int, num_patches: int, *, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample uniform random masking (MAE Sec. 3): each image keeps its own random subset of
    round(N * (1 - mask_ratio)) patches, the same count for every image so the batch stays dense.

    Returns keep (B, K) indices of the visible patches, mask (B, N) bool (True = hidden), and
    restore (B, N), the permutation that puts [visible..., hidden...] back in raster order.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    keep_count = max(1, round(num_patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator else device)
    shuffle = noise.argsort(dim=1).to(device)  # (B, N): a random order per sample
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, :keep_count]  # (B, K)
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return keep, mask, restore


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (B, K) of x (B, N, D) -> (B, K, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskedAutoencoder(nn.Module):
    """A ViT encoder that sees only visible patches, and a lightweight decoder (MAE Fig. 1)."""

    def __init__(self, encoder: VisionTransformer, *, decoder_dim: int = 128, decoder_depth: int = 4,
                 decoder_heads: int = 4, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        config = encoder.config
        if config.hybrid_stem:
            # A CNN stem's receptive field crosses patch borders: hidden pixels would leak into visible tokens.
            raise VitkitError("MAE needs a plain patch embedding; this model has a hybrid (CNN) stem")
        if decoder_dim % decoder_heads:
            raise VitkitError(f"--decoder-dim {decoder_dim} must be divisible by the decoder's {decoder_heads} heads")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        prefix = config.num_prefix_tokens
        self.decoder_embed = nn.Linear(config.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, prefix + config.num_patches, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, num_heads=decoder_heads, mlp_dim=4 * decoder_dim, norm_eps=config.norm_eps)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=config.norm_eps)
        P, Q = config.patch_size
        self.decoder_pred = nn.Linear(decoder_dim, P * Q * config.in_chans)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_encoder(self, images: Tensor, keep: Tensor) -> Tensor:
        """Embed all patches, keep the visible ones, run the encoder: (B, prefix + K, D)."""
        enc, config = self.encoder, self.encoder.config
        prefix = config.num_prefix_tokens
        x = enc.patch_embed(images)  # (B, N, D)
        pos = enc.pos_embed
        prefix_pos = pos[:, :prefix] if config.prefix_pos_embed else None
        x = _gather(x + pos[:, -config.num_patches:], keep)  # (B, K, D): position added before dropping
        tokens = [t.expand(x.shape[0], -1, -1) for t in (enc.cls_token, enc.dist_token, enc.reg_token) if t is not None]
        if tokens:
            prefix_tokens = torch.cat(tokens, dim=1)  # (B, prefix, D)
            if prefix_pos is not None:
                prefix_tokens = prefix_tokens + prefix_pos
            x = torch.cat([prefix_tokens, x], dim=1)
        x = enc.pos_drop(x)
        for block in enc.blocks:
            x, _ = block(x)
        return enc.norm(x)

    def forward_decoder(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Visible latents + mask tokens, back in raster order, through the decoder: (B, N, P*Q*C)."""
        prefix = self.encoder.config.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + K, Dd)
        B, N = restore.shape
        visible = x[:, prefix:]
        hidden = self.mask_token.expand(B, N - visible.shape[1], -1)
        patches = _gather(torch.cat([visible, hidden], dim=1), restore)  # (B, N, Dd), raster order
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x, _ = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def target(self, images: Tensor) -> Tensor:
        """What the decoder predicts: each patch's pixels, normalised per patch (MAE's best target)."""
        target = patchify(images, self.encoder.config.patch_size)
        if self.norm_pix_loss:
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, C, H, W) at the encoder's img_size -> (loss, prediction (B, N, P*Q*C), mask (B, N))."""
        config = self.encoder.config
        if tuple(images.shape[-2:]) != config.img_size:
            raise VitkitError(f"MAE images must be {config.img_size[0]}x{config.img_size[1]}, got "
                              f"{images.shape[-2]}x{images.shape[-1]}")
        keep, mask, restore = random_masking(images.shape[0], config.num_patches, mask_ratio=self.mask_ratio,
                                             device=images.device, generator=generator)
        pred = self.forward_decoder(self.forward_encoder(images, keep), restore)
        per_patch = (pred - self.target(images)).pow(2).mean(dim=-1)  # (B, N)
        loss = (per_patch * mask).sum() / mask.sum()  # hidden patches only
        return loss, pred, mask


# ---------------------------------------------------------------------------- figures
def draw_reconstructions(mae: MaskedAutoencoder, images: Tensor, *, path: str | Path,
                         mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0) -> Path:
    """A PNG with one row per image: original | masked (hidden patches grey) | reconstruction
    (the decoder's hidden patches, de-normalised with the true patch statistics, plus the visible ones)."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    config = mae.encoder.config
    was_training = mae.training
    mae.eval()
    with torch.no_grad():
        generator = torch.Generator(device=images.device).manual_seed(seed)
        _, pred, mask = mae(images, generator=generator)
        patches = patchify(images, config.patch_size)  # (B, N, P*Q*C)
        if mae.norm_pix_loss:
            var, mu = torch.var_mean(patches, dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mu
        m = mask.unsqueeze(-1).float()
        grid = config.grid_size
        masked = unpatchify(patches * (1 - m), config.patch_size, grid, config.in_chans)
        recon = unpatchify(patches * (1 - m) + pred * m, config.patch_size, grid, config.in_chans)
    mae.train(was_training)
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)

    def show(x: Tensor) -> Any:
        return (x * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)

    columns = [("original", show(images)), ("masked", show(masked)), ("reconstruction", show(recon))]
    rows = images.shape[0]
    fig = Figure(figsize=(6, 2 * rows))
    axes = fig.subplots(rows, 3, squeeze=False)
    for r in range(rows):
        for c, (title, pictures) in enumerate(columns):
            axes[r][c].imshow(pictures[r], interpolation="nearest")
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


# ---------------------------------------------------------------------------- the pre-training loop
@dataclass
class PretrainResult:
    run_dir: Path
    encoder: VisionTransformer
    train_loss: list[float] = field(default_factory=list)  # mean over each epoch
    val_loss: list[float] = field(default_factory=list)  # on fixed masks of the validation split
    figures: list[Path] = field(default_factory=list)


SETTINGS_FILE = "pretrain.json"  # a run's settings, so that --resume can rebuild it


def pretrain_mae(*, model: str | ViTConfig | VisionTransformer | None = None, out: str | Path,
                 data: str | None = None, epochs: int | None = None, batch_size: int = 256, lr: float = 1.5e-4,
                 weight_decay: float = 0.05, warmup_epochs: int = 5, mask_ratio: float = 0.75,
                 decoder_dim: int = 128, decoder_depth: int = 4, decoder_heads: int = 4,
                 img_size: int | None = None, device: str | None = None, seed: int = 0,
                 max_train: int | None = None, max_val_batches: int = 4, draw: int = 6,
                 log: bool = True, resume: bool = False) -> PretrainResult:
    """Pre-train `model`'s encoder as a masked autoencoder on the images of `data` (labels ignored).

    model: a variant name, a ViTConfig or a VisionTransformer (e.g. to continue from weights).
    data: any folder or archive of images, in any layout (an ImageFolder's splits are kept), or
        anything else `vitkit.data.build_data` reads; None is the CIFAR-10 sample in the package.
    lr: the base LR per 256 images, scaled linearly with batch_size (MAE's rule; 1.5e-4 is theirs).
    epochs: default 100, or on resume the run's own.
    resume: continue the run in `out` from its last epoch (its saved settings apply; `epochs` and
        `device` may be given anew). The result equals an uninterrupted run's.
    Writes to `out`: pretrain.json (the settings), last/ (the encoder as a vitkit model without a
    head, plus train_state.pt with the decoder, optimiser and RNG state, saved every epoch),
    reconstructions/epoch_NNN.png (original | masked | reconstruction, `draw` validation images;
    the first, every tenth of the run and the last epoch), metrics.jsonl (one line per epoch) and
    summary.json.
    """
    from .checkpoint import restore_rng, rng_state, save_checkpoint
    from .data import build_data
    from .infer import resolve_device
    from .optim import build_optimizer, lr_at, set_lr
    from .pretrained import create_model, load_pretrained
    from .train import absolute_if_local, read_metrics

    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise VitkitError(f"--out {run_dir}: a file, not a directory")
    state = None
    if resume:
        settings, state = _resumed_settings(run_dir)
        epochs = epochs or settings["epochs"]
        data, batch_size, lr, weight_decay = settings["data"], settings["batch_size"], settings["lr"], settings["weight_decay"]
        warmup_epochs, mask_ratio, seed, max_train = (settings["warmup_epochs"], settings["mask_ratio"],
                                                      settings["seed"], settings["max_train"])
        decoder_dim, decoder_depth, decoder_heads = (settings["decoder_dim"], settings["decoder_depth"],
                                                     settings["decoder_heads"])
    elif (run_dir / "last").exists():
        raise VitkitError(f"--out {run_dir}: already holds a pre-training run; continue it with --resume {run_dir}, "
                          f"or choose another directory")
    epochs = 100 if epochs is None else epochs
    if epochs < 1:
        raise VitkitError(f"--epochs must be at least 1 (got {epochs})")
    if not 0.0 < mask_ratio < 1.0:
        raise VitkitError(f"--mask-ratio must lie in (0, 1) (got {mask_ratio})")
    for flag, value, least in (("--batch-size", batch_size, 1), ("--decoder-dim", decoder_dim, 1),
                               ("--decoder-depth", decoder_depth, 1), ("--decoder-heads", decoder_heads, 1),
                               ("--max-train", 1 if max_train is None else max_train, 1)):
        if value < least:
            raise VitkitError(f"{flag} must be at least {least} (got {value})")
    if decoder_dim % decoder_heads:
        raise VitkitError(f"--decoder-dim {decoder_dim} must be divisible by --decoder-heads {decoder_heads}")
    if not lr > 0:  # NaN fails too
        raise VitkitError(f"--lr must be positive (got {lr})")
    for flag, value in (("--weight-decay", weight_decay), ("--warmup-epochs", warmup_epochs)):
        if not value >= 0:
            raise VitkitError(f"{flag} must be at least 0 (got {value})")
    if state is not None and epochs < state["progress"]["epoch"]:
        raise VitkitError(f"--epochs {epochs}: the run in {run_dir} has already done {state['progress']['epoch']}")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    if state is not None:
        encoder = load_pretrained(run_dir / "last")
    elif isinstance(model, VisionTransformer):
        encoder = model
        if encoder.config.num_classes:  # a classifier's head: MAE trains none, and a stale one would be saved
            encoder.reset_classifier(0)
    else:
        overrides: dict[str, Any] = {"num_classes": 0}  # MAE trains no classifier; fine-tuning adds one
        if img_size is not None:
            overrides["img_size"] = img_size
        try:
            encoder = create_model(model, **overrides)
        except ValueError as error:
            raise VitkitError(f"--model: {error}") from None
    mae = MaskedAutoencoder(encoder, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                            decoder_heads=decoder_heads, mask_ratio=mask_ratio).to(dev)
    bundle = build_data(data, img_size=encoder.config.img_size, batch_size=batch_size, device=dev, seed=seed,
                        max_train=max_train, unlabelled=True)
    encoder.preprocessing = bundle.preprocessing
    steps_per_epoch = len(bundle.train)
    total_steps, warmup_steps = epochs * steps_per_epoch, min(warmup_epochs, epochs - 1) * steps_per_epoch
    base_lr = lr * batch_size / 256
    # The decoder is not a VisionTransformer: optim's layer ids do not apply, plain decay groups do.
    optimizer = build_optimizer(mae, lr=base_lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    run_dir.mkdir(parents=True, exist_ok=True)
    first_epoch, step, earlier_time = 0, 0, 0.0
    if state is None or settings["epochs"] != epochs:
        settings = dict(data=absolute_if_local(data), epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        warmup_epochs=warmup_epochs, mask_ratio=mask_ratio, decoder_dim=decoder_dim,
                        decoder_depth=decoder_depth, decoder_heads=decoder_heads, seed=seed, max_train=max_train)
        text = json.dumps(settings, indent=2) + "\n"
        atomic_write(run_dir / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(text))
    if state is None:
        _keep_epochs(run_dir / "metrics.jsonl", 0)  # a run killed before its first checkpoint left these
    else:
        mae.load_state_dict({**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **state["decoder"]})
        optimizer.load_state_dict(state["optimizer"])
        first_epoch, step = state["progress"]["epoch"], state["progress"]["step"]
        earlier_time = float(state["progress"].get("wall_time_s", 0.0))
        restore_rng(state["rng"], dev)
        _keep_epochs(run_dir / "metrics.jsonl", first_epoch)
    val_images = _spread_batches(bundle.val, max_val_batches)
    result = PretrainResult(run_dir=run_dir, encoder=encoder)
    run_started = time.perf_counter()
    for epoch in range(first_epoch, epochs):
        mae.train()
        started, total, count = time.perf_counter(), 0.0, 0
        for images, _ in bundle.train.iterate(epoch):
            set_lr(optimizer, lr_at(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps))
            loss, _, _ = mae(images)
            if not torch.isfinite(loss):
                raise VitkitError(f"the MAE loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count, step = total + loss.item(), count + 1, step + 1
        result.train_loss.append(total / max(count, 1))
        result.val_loss.append(_val_loss(mae, val_images, batch_size=batch_size, seed=seed))
        # About ten figures per run: the first epoch, every tenth of the run, and the last.
        if epoch == 0 or epoch == epochs - 1 or (epoch + 1) % max(1, epochs // 10) == 0:
            result.figures.append(draw_reconstructions(
                mae, val_images[:draw], path=run_dir / "reconstructions" / f"epoch_{epoch + 1:03d}.png",
                mean=bundle.preprocessing.mean, std=bundle.preprocessing.std, seed=seed))
        record = {"epoch": epoch + 1, "train_loss": result.train_loss[-1], "val_loss": result.val_loss[-1],
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 2)}
        with open(run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        progress = {"epoch": epoch + 1, "step": step, "wall_time_s": earlier_time + time.perf_counter() - run_started}
        train_state = {"progress": progress, "method": "mae", "rng": rng_state(dev),
                       "decoder": {k: v.detach().cpu() for k, v in mae.state_dict().items() if not k.startswith("encoder.")},
                       "optimizer": optimizer.state_dict()}
        save_checkpoint(run_dir, tag="last", model=encoder, train_state=train_state)
        if log:
            print(f"epoch {epoch + 1}/{epochs}  train loss {record['train_loss']:.4f}  val loss "
                  f"{record['val_loss']:.4f}  {record['seconds']:.1f}s", flush=True)
    # The same wall-time field as a training run's summary, so benchmarks can match compute across arms.
    records = read_metrics(run_dir / "metrics.jsonl")
    summary = {"run_dir": str(run_dir), "method": "mae", "epochs": epochs, "steps": step,
               "final_train_loss": records[-1]["train_loss"], "final_val_loss": records[-1]["val_loss"],
               "wall_time_s": earlier_time + time.perf_counter() - run_started,
               "train_images": bundle.train.num_samples, "device": str(dev), "mask_ratio": mask_ratio}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
    return result


def _resumed_settings(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved settings and training state of a pre-training run, checked before use."""
    from .checkpoint import load_train_state, recover
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        raise VitkitError(f"--resume {run_dir}: not a pre-training run directory (no {SETTINGS_FILE})")
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VitkitError(f"{path}: not readable ({error})") from None
    expected = {"data": (str, type(None)), "epochs": int, "batch_size": int, "lr": (int, float),
                "weight_decay": (int, float), "warmup_epochs": int, "mask_ratio": (int, float), "decoder_dim": int,
                "decoder_depth": int, "decoder_heads": int, "seed": int, "max_train": (int, type(None))}
    if not isinstance(settings, dict):
        raise VitkitError(f"{path}: the settings must be a JSON object")
    wrong = [k for k, kind in expected.items() if not isinstance(settings.get(k, ...), kind)
             or isinstance(settings.get(k), bool)]
    if wrong:
        raise VitkitError(f"{path}: missing or mistyped settings {wrong}")
    recover(run_dir)  # a kill between a checkpoint's two renames leaves it in .last.tmp / .last.old
    if not (run_dir / "last").exists():
        raise VitkitError(f"--resume {run_dir}: no checkpoint yet (it stopped before its first epoch ended, so "
                          "nothing was learnt); run the same command again without --resume")
    state = load_train_state(run_dir)
    if state.get("method") != "mae" or not {"decoder", "optimizer", "rng"} <= set(state):
        raise VitkitError(f"{run_dir / 'last'}: not an MAE pre-training state (written by an older vitkit?)")
    return settings, state


def _keep_epochs(path: Path, last_epoch: int) -> None:
    """Drop the metrics of epochs after the checkpoint (and a line a kill cut short)."""
    from .train import read_metrics, write_metrics

    if path.exists():
        write_metrics(path, [r for r in read_metrics(path) if r.get("epoch", 0) <= last_epoch])


def _spread_batches(loader: Any, count: int) -> Tensor:
    """`count` validation batches spread over the split: eval splits are often sorted by class."""
    total = len(loader)
    starts = sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(min(count, total))})
    # (B, C, H, W) per batch; the figure takes one image from each batch first, so it shows several classes.
    batches = [next(iter(loader.iterate(0, start_batch=s)))[0] for s in starts]
    columns = [b[i] for i in range(max(len(b) for b in batches)) for b in batches if i < len(b)]
    return torch.stack(columns)


def _val_loss(mae: MaskedAutoencoder, images: Tensor, *, batch_size: int, seed: int) -> float:
    """The masked loss on fixed validation images and fixed masks, so epochs compare."""
    mae.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            loss, _, _ = mae(chunk, generator=generator)
            total += loss.item() * len(chunk)
    mae.train()
    return total / len(images)


__all__ = ["MaskedAutoencoder", "patchify", "unpatchify", "random_masking", "draw_reconstructions",
           "pretrain_mae", "PretrainResult"]
