"""Datasets for training and evaluation: where images come from, and how batches reach the model.

Sources (`build_data(data=...)`):
  DIR                    ImageFolder layout: DIR/train/<class>/*, DIR/val/<class>/* (or test/)
  FILE.tar[.gz]|.tgz|.zip  the same layout inside an archive, read without extracting it
  cifar10[:ROOT], cifar100[:ROOT]  the official python-version files (downloaded when online)
  None                   the CIFAR-10 sample shipped inside the package (5,000 train + 1,000 test)
With `unlabelled=True` (MAE pre-training) a folder or archive of images in any layout also works.

Small datasets (decoded size <= IN_MEMORY_LIMIT) are decoded once into a uint8 (N, H, W, 3) tensor
on the loader's device and augmented batch-wise with tensor ops there, so a GPU never waits for
the CPU. Larger ones stream through a torch DataLoader with worker processes and PIL transforms.

Modules: sources (opening a source), decode (into memory, or a scan before streaming), loaders
(batches per epoch and rank), transforms (augmentation and eval resize, as tensor ops or PIL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Preprocessing, to_2tuple
from ..errors import VitkitError
from .decode import decode_all, probe_sizes, scan, warn_skipped
from .loaders import BatchLoader, StreamingLoader, TensorLoader
from .sources import SAMPLE_FILE, Split, open_source, open_unlabelled
from .transforms import pil_transform

IN_MEMORY_LIMIT = 2 * 1024**3  # bytes of decoded uint8 pixels; beyond this, stream from disk
AUGMENTS = (None, "none", "randaugment", "trivialaugment")


@dataclass
class DataBundle:
    """What `build_data` returns: both loaders, the label names, and the eval transform to save
    with checkpoints so that `vitkit predict` prepares images the same way."""

    train: BatchLoader
    val: BatchLoader
    class_names: list[str]
    preprocessing: Preprocessing
    skipped: list[str]


def _make_loader(split: Split, *, train: bool, img_size: tuple[int, int], preprocessing: Preprocessing,
                 batch_size: int, device, augment: str | None, random_erasing: float, workers: int, seed: int,
                 rank: int, world_size: int, strict: bool, in_memory: bool | None) -> tuple[BatchLoader, list[str]]:
    if workers < 0:
        raise VitkitError(f"--workers {workers}: must be 0 (one per core) or more")
    common = dict(batch_size=batch_size, train=train, seed=seed, rank=rank, world_size=world_size, device=device)
    # Storage: images of one size no larger than the eval transform's resize size stay as they
    # are; others are covered-and-cropped to that size, which the eval crop and the train crops
    # then cut from.
    # The probe only estimates the memory needed; decode_all sees every size and decides.
    sizes = probe_sizes(split)
    scale = preprocessing.resize / min(preprocessing.crop)
    storage = (math.ceil(preprocessing.crop[0] * scale), math.ceil(preprocessing.crop[1] * scale))
    stored_whole = len(set(sizes)) == 1 and sizes[0][0] <= storage[1] and sizes[0][1] <= storage[0]  # (W, H)
    per_image = 3 * (sizes[0][0] * sizes[0][1] if stored_whole else storage[0] * storage[1])
    if in_memory is None and preprocessing.resize_mode != "shorter":
        # Stored images are cover-cropped, which an aspect-changing resize must not see: stream.
        in_memory = split.pixels is not None
    if in_memory is None:
        in_memory = split.pixels is not None or len(split) * per_image <= IN_MEMORY_LIMIT
    if in_memory:
        pixels, labels, skipped = decode_all(split, storage=storage, workers=workers, strict=strict)
        loader = TensorLoader(pixels, labels, img_size=img_size, preprocessing=preprocessing, augment=augment,
                              random_erasing=random_erasing, **common)
        return loader, skipped
    if split.pixels is not None:
        raise VitkitError("in_memory=False: this dataset comes decoded and always stays in memory")
    transform = pil_transform(train=train, img_size=img_size, preprocessing=preprocessing, augment=augment,
                               random_erasing=random_erasing)
    split, skipped = scan(split, workers=workers, strict=strict)
    loader = StreamingLoader(split, transform=transform, workers=workers, img_size=img_size, strict=strict, **common)
    return loader, skipped


def build_data(data: str | None, *, img_size: int | tuple[int, int], batch_size: int,
               device: str | torch.device = "cpu", augment: str | None = None, random_erasing: float = 0.0,
               workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, strict: bool = False,
               in_memory: bool | None = None, mean: tuple[float, float, float] | None = None,
               std: tuple[float, float, float] | None = None, max_train: int | None = None,
               unlabelled: bool = False, interpolation: str | None = None) -> DataBundle:
    """Train and val loaders for `data` (see the module docstring for the sources).

    img_size: the model's input (H, W). batch_size: per process. augment: None (random crop with
    4-px reflect padding for images <= 64 px, else random-resized-crop; plus horizontal flip),
    "none" (no augmentation), "randaugment" or "trivialaugment" (on top of the crop and flip).
    random_erasing: probability per training sample. mean/std: normalisation, default 0.5 (the
    paper's [-1, 1] pixels). interpolation: of the eval resize (default bicubic). max_train: keep
    a seeded random subset of that many training images.
    strict: raise at the first unreadable image instead of skipping it with one warning.
    unlabelled: labels will be ignored, so any folder or archive of images will do (not only an
    ImageFolder): every 20th image is then held out as the val split, and all labels are 0.
    """
    if augment not in AUGMENTS:
        raise VitkitError(f"--augment {augment!r}: expected none, randaugment or trivialaugment")
    if not 0.0 <= random_erasing <= 1.0:
        raise VitkitError(f"--random-erasing {random_erasing}: must lie in [0, 1]")
    img_size = to_2tuple(img_size, name="--img-size")
    extra = {k: v for k, v in (("mean", mean), ("std", std), ("interpolation", interpolation)) if v is not None}
    try:
        preprocessing = Preprocessing.for_size(img_size, **extra)
    except ValueError as error:
        raise VitkitError(str(error)) from None
    opener = open_unlabelled if unlabelled else open_source
    train_split, class_names = opener(data, "train")
    val_split, _ = opener(data, "val")
    if max_train is not None and max_train < len(train_split):
        keep = np.sort(np.random.default_rng(seed).permutation(len(train_split))[:max_train])
        train_split = train_split.subset(keep)
    options = dict(img_size=img_size, preprocessing=preprocessing, batch_size=batch_size, device=device,
                   augment=augment, random_erasing=random_erasing, workers=workers, seed=seed, rank=rank,
                   world_size=world_size, strict=strict, in_memory=in_memory)
    train, skipped_train = _make_loader(train_split, train=True, **options)
    val, skipped_val = _make_loader(val_split, train=False, **options)
    skipped = skipped_train + skipped_val
    warn_skipped(skipped)
    _report_into(skipped, train, val)
    return DataBundle(train=train, val=val, class_names=class_names, preprocessing=preprocessing, skipped=skipped)


def build_eval_loader(data: str | None, *, preprocessing: Preprocessing, batch_size: int,
                      device: str | torch.device = "cpu", split: str = "val", workers: int = 0,
                      strict: bool = False, in_memory: bool | None = None,
                      class_names: list[str] | None = None) -> tuple[BatchLoader, list[str], list[str]]:
    """An evaluation loader (no augmentation, every image once, in order) for one split of
    `data`, prepared with a checkpoint's `preprocessing`. Returns (loader, class names, skipped).

    A folder or archive needs no train/ here: without one, the class names are the split's own.
    class_names (a model's): label the split by these names instead, so that a split holding only
    some of the classes still gets the model's indices; a class not among them is an error.
    """
    source, own_names = open_source(data, split, need_train=False)
    if class_names is not None:
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted(set(own_names[k] for k in np.unique(source.labels)) - set(index))
        if unknown:
            missing = sorted(set(class_names) - set(own_names))
            raise VitkitError(f"{data}: the {split} split has classes the model lacks: {unknown[:5]}"
                              + (f"; the model's classes not in it: {missing[:5]}" if missing else ""))
        source.labels = np.array([index[own_names[k]] for k in source.labels], dtype=np.int64)
        own_names = list(class_names)
    class_names = own_names
    loader, skipped = _make_loader(source, train=False, img_size=preprocessing.crop, preprocessing=preprocessing,
                                   batch_size=batch_size, device=device, augment="none", random_erasing=0.0,
                                   workers=workers, seed=0, rank=0, world_size=1, strict=strict,
                                   in_memory=in_memory)
    warn_skipped(skipped)
    _report_into(skipped, loader)
    return loader, class_names, skipped


def _report_into(skipped: list[str], *loaders: BatchLoader) -> None:
    """Streaming loaders append what they find unreadable only while iterating to `skipped`, the
    list the caller got, so a run's final count includes them."""
    for loader in loaders:
        if isinstance(loader, StreamingLoader):
            loader.skipped = skipped


__all__ = ["SAMPLE_FILE", "IN_MEMORY_LIMIT", "BatchLoader", "TensorLoader", "StreamingLoader", "DataBundle", "build_data", "build_eval_loader"]
