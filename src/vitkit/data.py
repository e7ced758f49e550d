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

Every batch depends only on (seed, epoch, batch index, rank, world_size): the epoch's permutation
is the same on every rank, rank r takes its slice of each global batch, and the random
augmentation of a sample is drawn from a generator seeded by (seed, epoch, batch index) for the
whole global batch. A run resumed at batch k therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Preprocessing, to_2tuple
from .errors import VitkitError
from .images import IMAGE_SUFFIXES, MAX_PIXELS, ImageReadError, decode_image

IN_MEMORY_LIMIT = 2 * 1024**3  # bytes of decoded uint8 pixels; beyond this, stream from disk
SAMPLE_FILE = Path(__file__).parent / "sample" / "cifar10_sample.npz"
AUGMENTS = (None, "none", "randaugment", "trivialaugment")
_SMALL_IMAGE = 64  # at or below this side, random crop with padding (CIFAR-style) instead of RRC
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


# ============================================================================ sources
@dataclass
class _Split:
    """One split of a source: per-sample names and labels, and a way to get each image."""

    names: list[str]
    labels: np.ndarray  # (N,) int64
    fetch: Callable[[int], bytes] | None = None  # encoded bytes of sample i
    pixels: np.ndarray | None = None  # already decoded (N, H, W, 3) uint8 (CIFAR's own files)
    on_disk: bool = False  # names are file paths, so a header can be read without the whole file

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: np.ndarray) -> "_Split":
        fetch = self.fetch
        return _Split(names=[self.names[i] for i in keep], labels=self.labels[keep],
                      fetch=None if fetch is None else (lambda i, _k=keep, _f=fetch: _f(int(_k[i]))),
                      pixels=None if self.pixels is None else self.pixels[keep], on_disk=self.on_disk)


def _open_source(data: str | None, split: str, *, need_train: bool = True) -> tuple[_Split, list[str]]:
    """(split, class names) for `data`; split is "train", "val" (falls back to "test") or "test".
    need_train=False (evaluation): a folder or archive without train/ takes its class names from
    the split itself."""
    if data is None:
        return _open_sample(split)
    text = str(data)
    if not text.strip():
        raise VitkitError("--data '': an empty path (an unset variable?); leave --data out for the built-in sample")
    lowered = text.lower()
    path = Path(text)
    # A data set folder or archive called cifar10 in the working directory is what the user means;
    # torchvision's own cifar10/ root (cifar-10-batches-py inside) is not one.
    is_dataset = path.is_file() or path.is_dir() and any((path / s).is_dir() for s in ("train", "val", "test"))
    for kind in ("cifar10", "cifar100"):
        if (lowered == kind or lowered.startswith(kind + ":")) and not is_dataset:
            root = text.split(":", 1)[1] if ":" in text else None
            return _open_cifar(kind, root, split)
    if path.is_dir():
        return _open_folder(path, split, need_train=need_train)
    if path.is_file() and lowered.endswith(_ARCHIVE_SUFFIXES):
        return _open_archive(path, split, need_train=need_train)
    if path.exists():
        raise VitkitError(f"{path}: not a dataset; expected a folder with train/ and val/ (or test/), "
                          f"or a {', '.join(_ARCHIVE_SUFFIXES)} archive of one")
    raise VitkitError(f"{text}: no such dataset folder or archive (or use cifar10, cifar100, or no --data "
                      "for the built-in sample)")


def _split_names(split: str) -> tuple[str, ...]:
    if split not in ("train", "val", "test"):
        raise VitkitError(f"split {split!r}: expected train, val or test")
    return ("val", "test") if split == "val" else (split,)


def _labelled(entries: list[tuple[str, str]], where: str, split: str,
              class_names: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(class, item) pairs -> (items, labels, class names), classes in sorted order."""
    classes = class_names if class_names is not None else sorted({c for c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c, _ in entries} - set(index))
    if unknown:
        raise VitkitError(f"{where}: the {split} split has classes the train split lacks: {unknown[:5]}")
    if not entries:
        raise VitkitError(f"{where}: the {split} split holds no images in <class>/ folders")
    entries = sorted(entries, key=lambda e: (index[e[0]], e[1]))
    return [item for _, item in entries], np.array([index[c] for c, _ in entries], dtype=np.int64), classes


def _class_dirs(split_dir: Path) -> list[Path]:
    """split_dir's class folders: hidden ones (.ipynb_checkpoints) are not classes."""
    return [d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _folder_entries(split_dir: Path) -> list[tuple[str, str]]:
    """(class, file) for every image below split_dir/<class>/: hidden files and folders
    (.DS_Store, .ipynb_checkpoints) and files of other kinds (README.txt, labels.csv) are not
    part of the data set."""
    return [(d.name, str(f)) for d in _class_dirs(split_dir)
            for f in d.rglob("*") if _may_be_image(f.name) and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(d).parts)]


def _may_be_image(name: str) -> bool:
    """Not hidden, and a suffix some Pillow plugin reads (.jfif, .jpe, ...) or none: the decoder decides."""
    from PIL import Image

    suffix = Path(name).suffix.lower()
    return not name.startswith(".") and (not suffix or suffix in IMAGE_SUFFIXES or suffix in Image.registered_extensions())


def _open_folder(root: Path, split: str, *, need_train: bool = True) -> tuple[_Split, list[str]]:
    folders = {p.name: p for p in root.iterdir() if p.is_dir()}
    train = folders.get("train")
    chosen = next((folders[n] for n in _split_names(split) if n in folders), None)
    if chosen is None or (train is None and need_train):
        raise VitkitError(f"{root}: an ImageFolder dataset needs {_wanted(split, need_train)} subfolders; "
                          f"found {sorted(folders) or 'none'}")
    entries = _folder_entries(chosen)
    class_names = sorted(d.name for d in _class_dirs(train or chosen))
    paths, labels, classes = _labelled(entries, str(root), chosen.name, class_names)
    return _Split(names=paths, labels=labels, fetch=_file_reader(paths), on_disk=True), classes


def _file_reader(paths: list[str]) -> Callable[[int], bytes]:
    """fetch(i): the bytes of file paths[i]; ImageReadError names a file that cannot be read."""

    def fetch(i: int) -> bytes:
        try:
            return Path(paths[i]).read_bytes()
        except OSError as error:
            raise ImageReadError(paths[i], f"cannot be read ({error.strerror or error})") from None

    return fetch


def _wanted(split: str, need_train: bool) -> str:
    """The folders a source must have, for error messages (training needs both splits)."""
    if need_train:
        return "train/ and val/ (or test/)"
    return "val/ (or test/)" if split == "val" else f"{split}/"


def _open_archive(path: Path, split: str, *, need_train: bool = True,
                  members: dict[str, bytes] | None = None) -> tuple[_Split, list[str]]:
    """Read the members of a .tar/.tar.gz/.zip ImageFolder into memory (compressed images are
    small; decoding happens later, in parallel). A single top folder around train/ is allowed.
    members: the archive already read (`_read_archive`), so it is not read again."""
    members = _read_archive(path) if members is None else members
    anchors = ("train",) if need_train else ("train", *_split_names(split))
    by_split = _archive_splits(members, anchors)
    if by_split is None:
        raise VitkitError(f"{path}: the archive holds no {' or '.join(f'{a}/<class>/<image>' for a in anchors)} "
                          "members")
    chosen = next((n for n in _split_names(split) if n in by_split), None)
    if chosen is None or ("train" not in by_split and need_train):
        raise VitkitError(f"{path}: an ImageFolder archive needs {_wanted(split, need_train)} folders; "
                          f"found {sorted(by_split) or 'none'}")
    class_names = sorted({c for c, _ in by_split.get("train", by_split[chosen])})
    names, labels, classes = _labelled(by_split[chosen], str(path), chosen, class_names)
    data = [members[n] for n in names]
    return _Split(names=[f"{path}:{n}" for n in names], labels=labels, fetch=data.__getitem__), classes


def _read_archive(path: Path) -> dict[str, bytes]:
    """Every file member of a .tar/.tar.gz/.zip (a tar's links read as their targets): name -> bytes."""
    members: dict[str, bytes] = {}
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir():
                        members[info.filename] = archive.read(info)
        else:
            with tarfile.open(path) as archive:
                for info in archive:
                    if info.isfile() or info.islnk() or info.issym():
                        try:
                            handle = archive.extractfile(info)
                        except (KeyError, RecursionError):  # a link to a member the archive lacks, or a loop
                            continue
                        members[info.name] = handle.read() if handle is not None else b""
                _check_tar_end(archive)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
        detail = (str(error).strip().splitlines() or [""])[0]
        raise VitkitError(f"{path}: not a readable archive ({type(error).__name__}: {detail})") from None
    return members


def _check_tar_end(archive: tarfile.TarFile) -> None:
    """tarfile ends its listing quietly at a damaged header after the first, as if the archive
    ended there; what follows the last member must be the zero blocks of a real end."""
    if archive.fileobj.tell() < archive.offset:  # never back: a gzip stream would decompress again
        archive.fileobj.seek(archive.offset)
    while block := archive.fileobj.read(1 << 20):
        if block.count(0) != len(block):
            raise tarfile.ReadError(f"a damaged member header at byte {archive.offset}; the rest of the archive "
                                    "cannot be listed")


def _archive_splits(members: dict[str, bytes],
                    anchors: tuple[str, ...] = ("train",)) -> dict[str, list[tuple[str, str]]] | None:
    """split folder -> (class, member name) pairs; None without an <anchor>/<class>/<image> member
    for any of `anchors` (tried in order: the first one found fixes the split folders' depth)."""
    # parts: [prefix..., split, class, ..., file]
    # macOS zips carry a __MACOSX/ copy of the tree, of resource forks, not images.
    split_parts = [name.strip("/").split("/") for name in members]
    split_parts = [[] if parts[0] == "__MACOSX" else parts for parts in split_parts]
    depth = next((parts.index(anchor) for anchor in anchors for parts in split_parts if anchor in parts[:-2]), None)
    if depth is None:
        return None
    by_split: dict[str, list[tuple[str, str]]] = {}
    for name, parts in zip(members, split_parts):
        if len(parts) >= depth + 3 and _may_be_image(parts[-1]) and not any(p.startswith(".") for p in parts[depth:]):
            by_split.setdefault(parts[depth], []).append((parts[depth + 1], name))
    return by_split


_HOLDOUT_EVERY = 20  # unlabelled images: every 20th (5%) is held out for the validation loss


def _open_unlabelled(data: str | None, split: str) -> tuple[_Split, list[str]]:
    """For methods that ignore labels (MAE): an ImageFolder source as it is, or else every image
    found in a folder or archive, any layout, with every 20th image held out as the val split."""
    path = Path(str(data)) if data is not None else None
    if path is None or not (path.is_dir() or path.is_file() and str(path).lower().endswith(_ARCHIVE_SUFFIXES)):
        return _open_source(data, split)  # the sample, CIFAR, or a path error
    if path.is_dir():
        if (path / "train").is_dir() and any((path / n).is_dir() for n in _split_names("val")):
            return _open_folder(path, split)
        names = sorted(str(f) for f in path.rglob("*") if f.is_file() and _is_image_name(f.name))
        fetch = _file_reader(names)
    else:
        members = _read_archive(path)
        by_split = _archive_splits(members)
        if by_split and "train" in by_split and any(n in by_split for n in _split_names("val")):
            return _open_archive(path, split, members=members)
        member_names = sorted(n for n in members if _is_image_name(n.rsplit("/", 1)[-1]))
        names = [f"{path}:{n}" for n in member_names]
        fetch = [members[n] for n in member_names].__getitem__
    if not names:
        raise VitkitError(f"{path}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    held_out = np.arange(_HOLDOUT_EVERY - 1, len(names), _HOLDOUT_EVERY)
    if split == "train":
        # Fewer than 20 images: train on all of them (the val loss then reads one of them).
        keep = np.setdiff1d(np.arange(len(names)), held_out) if len(held_out) else np.arange(len(names))
    else:
        keep = held_out if len(held_out) else np.array([len(names) - 1])
    whole = _Split(names=names, labels=np.zeros(len(names), dtype=np.int64), fetch=fetch, on_disk=path.is_dir())
    return whole.subset(keep), ["image"]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _open_sample(split: str) -> tuple[_Split, list[str]]:
    from .weights import read_npz

    if not SAMPLE_FILE.is_file():
        raise VitkitError(f"{SAMPLE_FILE}: the built-in sample is missing from this installation")
    arrays = read_npz(SAMPLE_FILE)
    key = "train" if split == "train" else "test"
    blob, offsets = arrays[f"{key}_bytes"], arrays[f"{key}_offsets"]
    labels = arrays[f"{key}_labels"].astype(np.int64)
    names = [f"sample:{key}/{i}" for i in range(len(labels))]
    return (_Split(names=names, labels=labels, fetch=lambda i: blob[offsets[i]:offsets[i + 1]].tobytes()),
            [str(c) for c in arrays["class_names"]])


class _PlainUnpickler(pickle.Unpickler):
    """CIFAR's official files are pickles of dicts of numpy arrays. Only the globals needed to
    rebuild a numpy array may load; anything else (a callable that runs code) is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


def _open_cifar(kind: str, root: str | None, split: str) -> tuple[_Split, list[str]]:
    folder, url, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[kind]
    base = Path(root).expanduser() if root else Path(os.environ.get("VITKIT_CACHE", "~/.cache/vitkit")).expanduser()
    directory = base / folder if (base / folder).is_dir() or not (base / meta_file).is_file() else base
    if not (directory / meta_file).is_file():
        if root:
            raise VitkitError(f"{kind}:{root}: no {folder}/{meta_file} there (the official python version)")
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(url, str(base))
        except Exception as error:  # network errors come in many types
            raise VitkitError(f"{kind}: could not download {url} ({error}); pass {kind}:/path/to/root "
                              "holding the official files") from None

    def load(name: str) -> dict:
        try:
            with open(directory / name, "rb") as handle:
                return _PlainUnpickler(handle, encoding="latin1").load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
            raise VitkitError(f"{directory / name}: not a CIFAR batch file ({error})") from None

    classes = [str(c) for c in load(meta_file)[names_key]]
    batches = [load(n) for n in (train_files if split == "train" else test_files)]
    pixels = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    pixels = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for b in batches])
    names = [f"{kind}:{split}/{i}" for i in range(len(labels))]
    return _Split(names=names, labels=labels, pixels=np.ascontiguousarray(pixels)), classes


# ============================================================================ decoding
def _decode_all(split: _Split, *, storage: tuple[int, int], workers: int,
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


def _warn_skipped(skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:20]) + ("; ..." if len(skipped) > 20 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {shown}", stacklevel=3)


def _probe_sizes(split: _Split, count: int = 16) -> list[tuple[int, int]]:
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


def _scan(split: _Split, *, workers: int, strict: bool) -> tuple[_Split, list[str]]:
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


# ============================================================================ loaders
def _generator(*keys: int) -> torch.Generator:
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
                self._order = (epoch, torch.randperm(self.num_samples, generator=_generator(self.seed, epoch)))
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
                g = _generator(self.seed, epoch, index, 1)
                x = _augment_batch(x, total=len(chosen), part=part, generator=g, img_size=self.img_size,
                                   augment=self.augment, erasing=self.random_erasing, mean=self.mean, std=self.std)
            else:
                x = (_eval_resize(x, self.preprocessing) / 255.0 - self.mean) / self.std
                if self.train and self.random_erasing > 0:  # augment="none" still honours an explicit erasing
                    u = torch.rand(len(chosen), 5, generator=_generator(self.seed, epoch, index, 1))[part]
                    x = _random_erasing(x, to_device_async(u, self.device), self.random_erasing)
            yield x.contiguous(), self.labels[local]


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes one image per item with PIL transforms; each item carries its own seed.
    An image that cannot be decoded comes back as its error message instead of a tensor."""

    def __init__(self, split: _Split, transform) -> None:
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

    `split` should already be without the images a scan found unreadable (see _scan). One that
    fails anyway is dropped from its batch with its label, named in a warning the first time and
    appended to `skipped` (the list build_data and build_eval_loader return), or, when `strict`,
    raised.
    """

    def __init__(self, split: _Split, *, transform, workers: int, img_size: tuple[int, int], strict: bool = False,
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
            batches.append([(int(chosen[p]), int(_generator(self.seed, epoch, index, p).initial_seed()))
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
                _warn_skipped(new)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ============================================================================ tensor transforms
def _eval_resize(x: Tensor, preprocessing: Preprocessing) -> Tensor:
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


def _augment_batch(x: Tensor, *, total: int, part: slice, generator: torch.Generator, img_size: tuple[int, int],
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
        x = _random_erasing(x, draw(5), erasing)
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


def _random_erasing(x: Tensor, u: Tensor, p: float) -> Tensor:
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


# ============================================================================ PIL transforms (streaming)
def _pil_transform(*, train: bool, img_size: tuple[int, int], preprocessing: Preprocessing, augment: str | None,
                   random_erasing: float):
    from torchvision.transforms import v2

    from .images import preprocess

    if not train or augment == "none":
        erase = v2.RandomErasing(p=random_erasing) if train and random_erasing > 0 else (lambda x: x)
        return lambda image: erase(preprocess(image, preprocessing))
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


# ============================================================================ public API
@dataclass
class DataBundle:
    """What `build_data` returns: both loaders, the label names, and the eval transform to save
    with checkpoints so that `vitkit predict` prepares images the same way."""

    train: BatchLoader
    val: BatchLoader
    class_names: list[str]
    preprocessing: Preprocessing
    skipped: list[str]


def _make_loader(split: _Split, *, train: bool, img_size: tuple[int, int], preprocessing: Preprocessing,
                 batch_size: int, device, augment: str | None, random_erasing: float, workers: int, seed: int,
                 rank: int, world_size: int, strict: bool, in_memory: bool | None) -> tuple[BatchLoader, list[str]]:
    if workers < 0:
        raise VitkitError(f"--workers {workers}: must be 0 (one per core) or more")
    common = dict(batch_size=batch_size, train=train, seed=seed, rank=rank, world_size=world_size, device=device)
    # Storage: images of one size no larger than the eval transform's resize size stay as they
    # are; others are covered-and-cropped to that size, which the eval crop and the train crops
    # then cut from.
    # The probe only estimates the memory needed; _decode_all sees every size and decides.
    sizes = _probe_sizes(split)
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
        pixels, labels, skipped = _decode_all(split, storage=storage, workers=workers, strict=strict)
        loader = TensorLoader(pixels, labels, img_size=img_size, preprocessing=preprocessing, augment=augment,
                              random_erasing=random_erasing, **common)
        return loader, skipped
    if split.pixels is not None:
        raise VitkitError("in_memory=False: this dataset comes decoded and always stays in memory")
    transform = _pil_transform(train=train, img_size=img_size, preprocessing=preprocessing, augment=augment,
                               random_erasing=random_erasing)
    split, skipped = _scan(split, workers=workers, strict=strict)
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
    opener = _open_unlabelled if unlabelled else _open_source
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
    _warn_skipped(skipped)
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
    source, own_names = _open_source(data, split, need_train=False)
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
    _warn_skipped(skipped)
    _report_into(skipped, loader)
    return loader, class_names, skipped


def _report_into(skipped: list[str], *loaders: BatchLoader) -> None:
    """Streaming loaders append what they find unreadable only while iterating to `skipped`, the
    list the caller got, so a run's final count includes them."""
    for loader in loaders:
        if isinstance(loader, StreamingLoader):
            loader.skipped = skipped


__all__ = ["BatchLoader", "TensorLoader", "StreamingLoader", "DataBundle", "build_data", "build_eval_loader"]
