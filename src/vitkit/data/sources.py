"""Where images come from: folders, archives, CIFAR's official files and the built-in sample,
each opened as a `Split` of names, labels and a way to fetch each image's bytes."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VitkitError
from ..images import IMAGE_SUFFIXES, ImageReadError

SAMPLE_FILE = Path(__file__).parent.parent / "sample" / "cifar10_sample.npz"
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


@dataclass
class Split:
    """One split of a source: per-sample names and labels, and a way to get each image."""

    names: list[str]
    labels: np.ndarray  # (N,) int64
    fetch: Callable[[int], bytes] | None = None  # encoded bytes of sample i
    pixels: np.ndarray | None = None  # already decoded (N, H, W, 3) uint8 (CIFAR's own files)
    on_disk: bool = False  # names are file paths, so a header can be read without the whole file

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: np.ndarray) -> "Split":
        return Split(names=[self.names[i] for i in keep], labels=self.labels[keep],
                      fetch=None if self.fetch is None else _SubsetFetch(self.fetch, keep),
                      pixels=None if self.pixels is None else self.pixels[keep], on_disk=self.on_disk)


def open_source(data: str | None, split: str, *, need_train: bool = True) -> tuple[Split, list[str]]:
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


def _open_folder(root: Path, split: str, *, need_train: bool = True) -> tuple[Split, list[str]]:
    folders = {p.name: p for p in root.iterdir() if p.is_dir()}
    train = folders.get("train")
    chosen = next((folders[n] for n in _split_names(split) if n in folders), None)
    if chosen is None or (train is None and need_train):
        raise VitkitError(f"{root}: an ImageFolder dataset needs {_wanted(split, need_train)} subfolders; "
                          f"found {sorted(folders) or 'none'}")
    entries = _folder_entries(chosen)
    class_names = sorted(d.name for d in _class_dirs(train or chosen))
    paths, labels, classes = _labelled(entries, str(root), chosen.name, class_names)
    return Split(names=paths, labels=labels, fetch=_FileReader(paths), on_disk=True), classes


# The fetchers are classes, not closures: DataLoader workers started by "spawn" (macOS and
# Windows) receive the dataset pickled, and a closure cannot be pickled.
class _FileReader:
    """fetch(i): the bytes of file paths[i]; ImageReadError names a file that cannot be read."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __call__(self, i: int) -> bytes:
        try:
            return Path(self.paths[i]).read_bytes()
        except OSError as error:
            raise ImageReadError(self.paths[i], f"cannot be read ({error.strerror or error})") from None


class _SubsetFetch:
    """fetch(i) of a subset: sample keep[i] of the whole."""

    def __init__(self, fetch: Callable[[int], bytes], keep: np.ndarray) -> None:
        self.fetch, self.keep = fetch, keep

    def __call__(self, i: int) -> bytes:
        return self.fetch(int(self.keep[i]))


class _BlobSlices:
    """fetch(i): bytes offsets[i]:offsets[i + 1] of one blob (the built-in sample's layout)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    def __call__(self, i: int) -> bytes:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()


def _wanted(split: str, need_train: bool) -> str:
    """The folders a source must have, for error messages (training needs both splits)."""
    if need_train:
        return "train/ and val/ (or test/)"
    return "val/ (or test/)" if split == "val" else f"{split}/"


def _open_archive(path: Path, split: str, *, need_train: bool = True,
                  members: dict[str, bytes] | None = None) -> tuple[Split, list[str]]:
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
    return Split(names=[f"{path}:{n}" for n in names], labels=labels, fetch=data.__getitem__), classes


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


def open_unlabelled(data: str | None, split: str) -> tuple[Split, list[str]]:
    """For methods that ignore labels (MAE): an ImageFolder source as it is, or else every image
    found in a folder or archive, any layout, with every 20th image held out as the val split."""
    path = Path(str(data)) if data is not None else None
    if path is None or not (path.is_dir() or path.is_file() and str(path).lower().endswith(_ARCHIVE_SUFFIXES)):
        return open_source(data, split)  # the sample, CIFAR, or a path error
    if path.is_dir():
        if (path / "train").is_dir() and any((path / n).is_dir() for n in _split_names("val")):
            return _open_folder(path, split)
        names = sorted(str(f) for f in path.rglob("*") if f.is_file() and _is_image_name(f.name))
        fetch = _FileReader(names)
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
    whole = Split(names=names, labels=np.zeros(len(names), dtype=np.int64), fetch=fetch, on_disk=path.is_dir())
    return whole.subset(keep), ["image"]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _open_sample(split: str) -> tuple[Split, list[str]]:
    from ..weights import read_npz

    if not SAMPLE_FILE.is_file():
        raise VitkitError(f"{SAMPLE_FILE}: the built-in sample is missing from this installation")
    arrays = read_npz(SAMPLE_FILE)
    key = "train" if split == "train" else "test"
    blob, offsets = arrays[f"{key}_bytes"], arrays[f"{key}_offsets"]
    labels = arrays[f"{key}_labels"].astype(np.int64)
    names = [f"sample:{key}/{i}" for i in range(len(labels))]
    return (Split(names=names, labels=labels, fetch=_BlobSlices(blob, offsets)),
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


def _open_cifar(kind: str, root: str | None, split: str) -> tuple[Split, list[str]]:
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
    return Split(names=names, labels=labels, pixels=np.ascontiguousarray(pixels)), classes
