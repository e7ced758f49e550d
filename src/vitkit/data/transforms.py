"""Image transforms: train-time augmentation and the eval resize as batch-wise tensor ops on
images held on the device, PIL transforms for streamed ones; and the seeded random draws and
non-blocking device copies they (and the loaders) use."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Preprocessing
from ..images import preprocess

_SMALL_IMAGE = 64  # at or below this side, random crop with padding (CIFAR-style) instead of RRC


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints, the same on every machine and rank."""
    seed = 0x9E3779B97F4A7C15
    for key in keys:
        seed = (seed * 6364136223846793005 + int(key) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)


def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on `device` without waiting for the GPU: a plain `.to("cuda")` from
    pageable memory synchronises the stream, so the CPU could not queue the next step while the
    GPU runs this one. From pinned memory the copy is queued like a kernel (PyTorch's pinned-memory
    cache keeps the buffer alive until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    # Contiguous first: from a strided view, the copy would go through a pageable temporary.
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def eval_resize(x: Tensor, preprocessing: Preprocessing) -> Tensor:
    """`vitkit.images.preprocess` on a batch (B, 3, H, W) in [0, 255]: resize the shorter side,
    centre-crop; values rounded to 8 bits as PIL would leave them."""
    crop_h, crop_w = preprocessing.crop
    H, W = x.shape[-2:]
    size = preprocessing.resized_size(H, W)
    if size != (H, W):
        mode = preprocessing.interpolation
        extra = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        x = F.interpolate(x, size=size, mode=mode, **extra).clamp_(0, 255).round_()
    top, left = (size[0] - crop_h) // 2, (size[1] - crop_w) // 2
    return x[:, :, top:top + crop_h, left:left + crop_w]


def augment_batch(x: Tensor, *, total: int, part: slice, generator: torch.Generator, img_size: tuple[int, int],
                   augment: str | None, erasing: float, mean: Tensor, std: Tensor) -> Tensor:
    """Train-time augmentation of a batch (B, 3, H, W) in [0, 255] -> normalised (B, 3, h, w).

    Random parameters are drawn for all `total` samples of the global batch and this rank keeps
    `part` of them, so a sample's augmentation does not depend on how many processes there are.
    """
    device = x.device
    H, W = x.shape[-2:]

    def draw_host(*shape: int) -> Tensor:  # uniform [0, 1) for the whole global batch, this rank's part
        return torch.rand(total, *shape, generator=generator)[part]

    def draw(*shape: int) -> Tensor:
        return to_device_async(draw_host(*shape), device)

    flip = draw() < 0.5
    if max(H, W) <= _SMALL_IMAGE:
        # CIFAR-style: pad 4 px by reflection, crop back at a random offset (He et al., 2016).
        pad = min(4, H - 1, W - 1)  # reflection needs a pad below the side (images of a few pixels)
        offsets = (draw(2) * (2 * pad + 1)).long()  # (B, 2) in [0, 2*pad]
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = offsets[:, 0:1] + torch.arange(H, device=device)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(W, device=device)  # (B, W)
        batch = torch.arange(x.shape[0], device=device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, 3, H, W)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if (H, W) != tuple(img_size):
            x = F.interpolate(x, size=img_size, mode="bilinear", antialias=True, align_corners=False)
    else:
        x = _random_resized_crop(x, draw(4), flip, img_size)
    x = x.clamp(0, 255) / 255.0
    if augment in ("randaugment", "trivialaugment"):
        x = _rand_augment(x, draw_host, wide=augment == "trivialaugment")
    x = (x - mean) / std
    if erasing > 0:
        x = random_erase(x, draw(5), erasing)
    return x


def _random_resized_crop(x: Tensor, u: Tensor, flip: Tensor, img_size: tuple[int, int]) -> Tensor:
    """Per-sample random-resized crop (scale 0.08-1, aspect 3/4-4/3; Szegedy et al., 2015) and
    flip, as one affine resampling. u: (B, 4) uniforms."""
    B = x.shape[0]
    H, W = x.shape[-2:]
    area = 0.08 + u[:, 0] * (1 - 0.08)
    log_ratio = math.log(3 / 4) + u[:, 1] * (math.log(4 / 3) - math.log(3 / 4))
    ratio = log_ratio.exp()
    # Crop width and height as fractions of the image; clamp instead of retrying.
    w = (area * ratio * H / W).sqrt().clamp(max=1.0)
    h = (area / ratio * W / H).sqrt().clamp(max=1.0)
    cx = (u[:, 2] * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (u[:, 3] * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [B, 3, *img_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W), ITU-R 601


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """factor * a + (1 - factor) * b, per sample, clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per sample and channel, on 8-bit levels."""
    B, C, H, W = x.shape
    levels = (x * 255).round().long().clamp(0, 255).reshape(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(H * W))).min(1, keepdim=True).values
    lut = ((cdf - cdf_min) / (H * W - cdf_min).clamp(min=1)).clamp(0, 1)
    return lut.gather(1, levels).view(B, C, H, W)


def _sharpen(x: Tensor, factor: Tensor) -> Tensor:
    kernel = torch.ones(3, 3, device=x.device)  # made on the device: a copy from the host would wait for it
    kernel[1, 1] = 5.0
    kernel = kernel / 13
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    return _blend(x, blurred, factor)


# RandAugment's 14 operations (Cubuk et al., 2020), magnitudes at bin 9 of 31 as torchvision's
# default; TrivialAugment-Wide (Muller & Hutter, 2021) draws the bin and uses wider ranges.
_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
        "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
_GEOMETRIC = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}


def _op_magnitude(op: str, level: Tensor, wide: bool, size: tuple[int, int]) -> Tensor:
    """level in [0, 1] (bin / 30) -> the op's magnitude, unsigned."""
    top = {"shear_x": 0.99 if wide else 0.3, "shear_y": 0.99 if wide else 0.3,
           "translate_x": 32.0 if wide else 150 / 331 * size[1], "translate_y": 32.0 if wide else 150 / 331 * size[0],
           "rotate": 135.0 if wide else 30.0}.get(op, 0.99 if wide else 0.9)
    if op == "posterize":
        return 8 - (level * 30 / (5 if wide else 7.5)).round()  # bits to keep
    if op == "solarize":
        return 1.0 - level  # threshold
    return level * top


def _rand_augment(x: Tensor, draw_host: Callable[..., Tensor], *, wide: bool) -> Tensor:
    """Per-sample RandAugment (2 ops, magnitude 9/30) or TrivialAugment (1 op, random magnitude)
    on x (B, 3, H, W) in [0, 1]. Each op runs once on the samples that chose it.

    The choices are drawn and grouped on the CPU (`draw_host`), so that finding which samples
    chose an op never waits for the GPU."""
    size = tuple(x.shape[-2:])
    for _ in range(1 if wide else 2):
        u = draw_host(3)  # op choice, magnitude, sign
        op_ids = (u[:, 0] * len(_OPS)).long().clamp(max=len(_OPS) - 1)
        level = u[:, 1] if wide else torch.full_like(u[:, 1], 9 / 30)
        sign = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
        level, sign = to_device_async(level, x.device), to_device_async(sign, x.device)
        out = x.clone()
        for k, op in enumerate(_OPS):
            chosen = (op_ids == k).nonzero().flatten()
            if op == "identity" or len(chosen) == 0:
                continue
            chosen = to_device_async(chosen, x.device)
            xs = x[chosen]
            m = _op_magnitude(op, level[chosen], wide, size)
            s = sign[chosen]
            if op in _GEOMETRIC:
                xs = _affine_op(xs, op, m * s, size)
            elif op in ("brightness", "color", "contrast", "sharpness"):
                factor = 1 + m * s
                if op == "brightness":
                    xs = _blend(xs, torch.zeros_like(xs), factor)
                elif op == "color":
                    xs = _blend(xs, _gray(xs).expand_as(xs), factor)
                elif op == "contrast":
                    xs = _blend(xs, _gray(xs).mean((1, 2, 3), keepdim=True).expand_as(xs), factor)
                else:
                    xs = _sharpen(xs, factor)
            elif op == "posterize":
                shift = (8 - m).long().clamp(0, 7).view(-1, 1, 1, 1)
                xs = (((xs * 255).round().long() >> shift) << shift).float() / 255
            elif op == "solarize":
                xs = torch.where(xs >= m.view(-1, 1, 1, 1), 1 - xs, xs)
            elif op == "autocontrast":
                low = xs.amin((2, 3), keepdim=True)
                high = xs.amax((2, 3), keepdim=True)
                xs = torch.where(high > low, (xs - low) / (high - low).clamp(min=1e-6), xs)
            elif op == "equalize":
                xs = _equalize(xs)
            out[chosen] = xs
        x = out
    return x


def _affine_op(x: Tensor, op: str, m: Tensor, size: tuple[int, int]) -> Tensor:
    """Shear, translate (pixels) or rotate (degrees) each sample by its own m, filling black."""
    B = x.shape[0]
    H, W = size
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    if op == "shear_x":
        theta[:, 0, 1] = m * H / W
    elif op == "shear_y":
        theta[:, 1, 0] = m * W / H
    elif op == "translate_x":
        theta[:, 0, 2] = 2 * m / W
    elif op == "translate_y":
        theta[:, 1, 2] = 2 * m / H
    else:
        angle = m * math.pi / 180
        cos, sin = angle.cos(), angle.sin()
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * H / W
        theta[:, 1, 0], theta[:, 1, 1] = sin * W / H, cos
    grid = F.affine_grid(theta, [B, 3, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erase(x: Tensor, u: Tensor, p: float) -> Tensor:
    """Zero a random rectangle (area 2-33%, aspect 0.3-3.3) of each sample with probability p
    (Zhong et al., 2020); x is already normalised, so zero is the dataset mean. u: (B, 5)."""
    B, _, H, W = x.shape
    area = (0.02 + u[:, 0] * (0.33 - 0.02)) * H * W
    ratio = (math.log(0.3) + u[:, 1] * (math.log(3.3) - math.log(0.3))).exp()
    h = (area * ratio).sqrt().round().clamp(1, H)
    w = (area / ratio).sqrt().round().clamp(1, W)
    top = (u[:, 2] * (H - h + 1)).floor()
    left = (u[:, 3] * (W - w + 1)).floor()
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))  # (B, H, W)
    erase = inside & (u[:, 4] < p).view(-1, 1, 1)
    return x.masked_fill(erase[:, None], 0.0)


class _EvalTransform:
    """`vitkit.images.preprocess`, then optionally random erasing. A class, not a closure: spawned
    DataLoader workers (macOS, Windows) receive it pickled."""

    def __init__(self, preprocessing: Preprocessing, erase=None) -> None:
        self.preprocessing, self.erase = preprocessing, erase

    def __call__(self, image) -> Tensor:
        x = preprocess(image, self.preprocessing)
        return self.erase(x) if self.erase is not None else x


def pil_transform(*, train: bool, img_size: tuple[int, int], preprocessing: Preprocessing, augment: str | None,
                   random_erasing: float):
    from torchvision.transforms import v2

    if not train or augment == "none":
        erase = v2.RandomErasing(p=random_erasing) if train and random_erasing > 0 else None
        return _EvalTransform(preprocessing, erase)
    steps = [v2.RandomResizedCrop(list(img_size), antialias=True) if min(img_size) > _SMALL_IMAGE
             else v2.Compose([v2.Resize(list(img_size), antialias=True),
                              v2.RandomCrop(list(img_size), padding=4, padding_mode="reflect")]),
             v2.RandomHorizontalFlip()]
    if augment == "randaugment":
        steps.append(v2.RandAugment())
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(list(preprocessing.mean), list(preprocessing.std))]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing))
    return v2.Compose(steps)
