"""Decoding a split: all of it into memory at once, or a scan for unreadable images before streaming."""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import VitkitError
from ..images import MAX_PIXELS, ImageReadError, decode_image
from .sources import Split


def decode_all(split: Split, *, storage: tuple[int, int], workers: int,
                strict: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image of `split` in parallel threads (Pillow releases the GIL while it
    decodes) into (N, H, W, 3) uint8. Images larger than `storage` (H, W) are cover-cropped to it;
    the others stay as they are if all have one size, else they are cover-cropped too.
    Returns (pixels, labels, skipped), unreadable images dropped."""
    if split.pixels is not None:
        return split.pixels, split.labels, []

    def one(i: int):
        try:
            image = decode_image(split.fetch(i), name=split.names[i])
        except ImageReadError as error:
            if strict:
                raise
            return str(error)
        # Cut down as soon as decoded: a folder of photos held at full size until the last is
        # read needs many times the memory of the stored set (2,000 phone photos: ~70 GB).
        return _cover_crop(image, storage) if image.height > storage[0] or image.width > storage[1] else image

    threads = workers if workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        images = list(pool.map(one, range(len(split)), chunksize=64))
    skipped = [r for r in images if isinstance(r, str)]
    keep = [i for i, r in enumerate(images) if not isinstance(r, str)]
    if not keep:
        raise VitkitError(f"none of the {len(split)} images could be read (first: {skipped[0]})")
    # Decided on the decoded images, not on a probe of a few headers: one outlier anywhere (or an
    # EXIF rotation, which headers do not show) makes the sizes mixed.
    sizes = {images[i].size for i in keep}
    if len(sizes) == 1:
        storage = next(iter(sizes))[::-1]
    out = np.empty((len(keep), *storage, 3), dtype=np.uint8)

    def place(j: int) -> None:
        image = images[keep[j]]
        out[j] = np.asarray(_cover_crop(image, storage))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(place, range(len(keep))))
    return out, split.labels[keep], skipped


def _cover_crop(image, size: tuple[int, int]):
    """Resize so the image covers `size` (H, W), then crop the centre: the storage form."""
    from PIL import Image

    h, w = size
    if image.size == (w, h):
        return image
    scale = max(h / image.height, w / image.width)
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(new, Image.BICUBIC, reducing_gap=None)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return image.crop((left, top, left + w, top + h))


def warn_skipped(skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:20]) + ("; ..." if len(skipped) > 20 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {shown}", stacklevel=3)


def probe_sizes(split: Split, count: int = 16) -> list[tuple[int, int]]:
    """(W, H) of a few images, read from their headers only."""
    from PIL import Image

    if split.pixels is not None:
        return [(split.pixels.shape[2], split.pixels.shape[1])]
    sizes = []
    step = max(1, len(split) // count)
    for i in range(0, len(split), step)[:count]:
        try:
            with Image.open(io.BytesIO(split.fetch(i))) as image:
                sizes.append(image.size)
        except Exception:  # a broken file says nothing about the others; decoding reports it
            continue
    return sizes


def scan(split: Split, *, workers: int, strict: bool) -> tuple[Split, list[str]]:
    """For streaming: (the split without its unreadable images, skipped), found before the first
    batch so that labels, sample counts and the skipped list match the in-memory path.

    Decoding everything up front would cost as much as an epoch, so each image's header is read
    instead (and a PNG's chunk checksums, which catch truncation without decompressing); only an
    image that fails this is decoded in full, which decides, and names the fault as
    `decode_image` does. A file that passes but cannot be decoded is dropped when it is reached.
    """
    from PIL import Image

    def looks_whole(i: int) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                source = split.names[i] if split.on_disk else io.BytesIO(split.fetch(i))
                with Image.open(source) as image:
                    if not 1 <= image.width * image.height <= MAX_PIXELS:
                        return False
                    if image.format == "PNG":
                        image.verify()
            return True
        except Exception:  # any fault at all: the full decode below says whether and why
            return False

    def check(i: int) -> str | None:
        if looks_whole(i):
            return None
        try:
            decode_image(split.fetch(i), name=split.names[i])
            return None
        except ImageReadError as error:
            return str(error)

    threads = workers if workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        faults = pool.map(check, range(len(split)), chunksize=64)
        if strict:  # the first unreadable image in the split's order, as the in-memory path reports
            first = next((f for f in faults if f is not None), None)
            if first is not None:
                pool.shutdown(wait=False, cancel_futures=True)  # the rest of the scan is moot
                raise VitkitError(first)
            return split, []
        faults = list(faults)
    skipped = [f for f in faults if f is not None]
    if len(skipped) == len(split):
        raise VitkitError(f"none of the {len(split)} images could be read (first: {skipped[0]})")
    if not skipped:
        return split, []
    return split.subset(np.array([i for i, f in enumerate(faults) if f is None])), skipped
