"""Batch loaders: which samples make up each batch of each epoch on each rank, and how their
images reach the device.

Every batch depends only on (seed, epoch, batch index, rank, world_size): the epoch's permutation
is the same on every rank, rank r takes its slice of each global batch, and the random
augmentation of a sample is drawn from a generator seeded by (seed, epoch, batch index) for the
whole global batch. A run resumed at batch k therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..config import Preprocessing
from ..errors import VitkitError
from ..images import ImageReadError, decode_image
from .decode import warn_skipped
from .sources import Split
from .transforms import augment_batch, eval_resize, random_erase, seeded_generator, to_device_async


class BatchLoader:
    """Batches for one split. `len(loader)` is the number of batches per epoch (train: full
    global batches only; eval: the last one may be partial, and on some ranks empty).

    Subclasses produce the images of given sample indices; this class decides which indices
    make up each batch of each epoch on each rank.
    """

    def __init__(self, *, labels: np.ndarray, batch_size: int, train: bool, seed: int, rank: int,
                 world_size: int, device: str | torch.device) -> None:
        if batch_size < 1:
            raise VitkitError(f"--batch-size must be at least 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise VitkitError(f"rank {rank} is outside world_size {world_size}")
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.num_samples = len(self.labels)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self._order: tuple[int | None, Tensor | None] = (None, None)  # (epoch, its sample order)
        if train and self.num_samples < batch_size * world_size:
            raise VitkitError(f"the training split has {self.num_samples} images, fewer than one global batch "
                              f"({batch_size} x {world_size} processes)")

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.train:
            return self.num_samples // global_batch
        return math.ceil(self.num_samples / global_batch)

    def _global_indices(self, epoch: int, index: int) -> Tensor:
        """Sample indices of global batch `index` of `epoch`, the same on every rank."""
        size = self.batch_size * self.world_size
        if self.train:
            if self._order[0] != epoch:  # one permutation per epoch, not per batch
                self._order = (epoch, torch.randperm(self.num_samples, generator=seeded_generator(self.seed, epoch)))
            return self._order[1][index * size:(index + 1) * size]
        return torch.arange(index * size, min((index + 1) * size, self.num_samples))

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images (B, 3, H, W) float32 normalised, labels (B,) int64), both on the device,
        for batches start_batch .. len(self) - 1 of `epoch`. B is the per-process batch size."""
        raise NotImplementedError

    def _rank_slice(self, count: int) -> slice:
        start = min(self.rank * self.batch_size, count)
        return slice(start, min(start + self.batch_size, count))


class TensorLoader(BatchLoader):
    """All images decoded once into a uint8 (N, H, W, 3) tensor on the device; augmentation runs
    batch-wise there with per-sample random parameters."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, *, img_size: tuple[int, int],
                 preprocessing: Preprocessing, augment: str | None, random_erasing: float, **kwargs) -> None:
        super().__init__(labels=labels, **kwargs)
        self.pixels = torch.from_numpy(pixels).to(self.device)  # (N, H, W, 3) uint8
        self.img_size, self.preprocessing = img_size, preprocessing
        self.augment, self.random_erasing = augment, random_erasing
        self.mean = torch.tensor(preprocessing.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing.std, device=self.device).view(1, 3, 1, 1)
        self.labels = self.labels.to(self.device)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(start_batch, len(self)):
            chosen = self._global_indices(epoch, index)
            part = self._rank_slice(len(chosen))
            local = to_device_async(chosen[part], self.device)
            x = self.pixels[local].permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
            if self.train and self.augment != "none":
                g = seeded_generator(self.seed, epoch, index, 1)
                x = augment_batch(x, total=len(chosen), part=part, generator=g, img_size=self.img_size,
                                   augment=self.augment, erasing=self.random_erasing, mean=self.mean, std=self.std)
            else:
                x = (eval_resize(x, self.preprocessing) / 255.0 - self.mean) / self.std
                if self.train and self.random_erasing > 0:  # augment="none" still honours an explicit erasing
                    u = torch.rand(len(chosen), 5, generator=seeded_generator(self.seed, epoch, index, 1))[part]
                    x = random_erase(x, to_device_async(u, self.device), self.random_erasing)
            yield x.contiguous(), self.labels[local]


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes one image per item with PIL transforms; each item carries its own seed.
    An image that cannot be decoded comes back as its error message instead of a tensor."""

    def __init__(self, split: Split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | str, int]:
        index, seed = item
        try:
            image = decode_image(self.split.fetch(index), name=self.split.names[index])
        except ImageReadError as error:
            # Not raised here: a worker process would wrap it in a multi-line RuntimeError.
            return str(error), int(self.split.labels[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), int(self.split.labels[index])


class _DropUnreadable:
    """Collate for _ImageDataset: stack the decoded samples with their own labels, and hand the
    unreadable ones' messages on separately. A class (not a closure) so workers can unpickle it."""

    def __init__(self, img_size: tuple[int, int]) -> None:
        self.img_size = img_size

    def __call__(self, samples: list[tuple[Tensor | str, int]]) -> tuple[Tensor, Tensor, list[str]]:
        good = [(image, label) for image, label in samples if not isinstance(image, str)]
        images = torch.stack([image for image, _ in good]) if good else torch.empty(0, 3, *self.img_size)
        labels = torch.tensor([label for _, label in good], dtype=torch.int64)
        return images, labels, [image for image, _ in samples if isinstance(image, str)]


class StreamingLoader(BatchLoader):
    """Images decoded on the fly by DataLoader workers, for datasets too large for memory.

    `split` should already be without the images a scan found unreadable (see scan). One that
    fails anyway is dropped from its batch with its label, named in a warning the first time and
    appended to `skipped` (the list build_data and build_eval_loader return), or, when `strict`,
    raised.
    """

    def __init__(self, split: Split, *, transform, workers: int, img_size: tuple[int, int], strict: bool = False,
                 **kwargs) -> None:
        super().__init__(labels=split.labels, **kwargs)
        self.dataset = _ImageDataset(split, transform)
        self.workers, self.img_size, self.strict = workers, img_size, strict
        self.skipped: list[str] = []

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        batches = []
        for index in range(start_batch, len(self)):
            chosen = self._global_indices(epoch, index)
            part = self._rank_slice(len(chosen))
            positions = range(len(chosen))[part]
            batches.append([(int(chosen[p]), int(seeded_generator(self.seed, epoch, index, p).initial_seed()))
                            for p in positions])
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=_DropUnreadable(self.img_size),
                                             pin_memory=self.device.type == "cuda")
        for x, y, unreadable in loader:
            if unreadable and self.strict:
                raise VitkitError(unreadable[0])
            new = [u for u in unreadable if u not in self.skipped]  # later epochs meet it again
            if new:
                self.skipped.extend(new)
                warn_skipped(new)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
