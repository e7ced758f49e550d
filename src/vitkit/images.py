"""Reading one image safely, and turning it into the model's input.

Every reader in vitkit (train, eval, predict, explain) goes through `read_image`, so all of them
accept the same files and reject the same broken ones with the same message.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .config import Preprocessing
from .errors import VitkitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
# Pillow's own guard: beyond this many pixels an image is treated as a decompression bomb.
MAX_PIXELS = 178_956_970


class ImageReadError(VitkitError):
    """An image file that cannot be used: missing, empty, truncated, not an image, or a bomb."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, whatever its mode, upright as its EXIF orientation says.

    Transparent pixels are composited onto white; 16-bit and float images are scaled to 8 bits.
    Raises ImageReadError naming the file for anything that is not a whole, sane image.
    """
    if not str(path).strip():
        raise ImageReadError("''", "an empty path")
    path = Path(path)
    if path.is_dir():
        empty = not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
        raise ImageReadError(path, "a folder, not an image file" + (" (and no images in it)" if empty else ""))
    if not path.is_file():
        pattern = any(ch in str(path) for ch in "*?[")
        raise ImageReadError(path, "matches no file" if pattern else "no such file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error.strerror or error})") from None
    return decode_image(data, name=str(path))


def decode_image(data: bytes, *, name: str) -> Image.Image:
    """`read_image` for bytes already in memory (an archive member, an embedded sample);
    `name` is what error messages call the image."""
    if len(data) == 0:
        raise ImageReadError(name, "the file is empty")
    try:
        with warnings.catch_warnings():
            # A bomb warning is as bad as the error Pillow raises at twice the size: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A damaged EXIF block loses only the orientation; the pixels are whole, and Pillow's
            # warning about it names no file.
            warnings.filterwarnings("ignore", message="Corrupt EXIF data")
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageReadError(name, f"{image.width}x{image.height} pixels exceeds the "
                                               f"{MAX_PIXELS:,}-pixel limit (a decompression bomb?)")
                if image.width < 1 or image.height < 1:
                    raise ImageReadError(name, f"an image of {image.width}x{image.height} pixels")
                image.load()
                image = ImageOps.exif_transpose(image) or image
                return to_rgb(image)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(name, f"refused as a decompression bomb ({error})") from None
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError, AttributeError,
            ZeroDivisionError, MemoryError, OverflowError, struct.error, RuntimeError) as error:
        # Pillow's decoders signal truncated or corrupt data through many exception types.
        raise ImageReadError(name, f"a broken or truncated image ({type(error).__name__}: {str(error)[:120]})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, keeping the look: alpha onto white, high bit depths scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if image.mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> Tensor:
    """RGB image -> normalised float tensor (3, H, W): resize (the shorter side, or a stretch: see
    `Preprocessing.resize_mode`), centre-crop, then (x / 255 - mean) / std, as the checkpoint's
    preprocessing says."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    mode = InterpolationMode(preprocessing.interpolation)
    crop_h, crop_w = preprocessing.crop
    size = preprocessing.resized_size(image.height, image.width)
    image = TF.resize(image, list(size), interpolation=mode, antialias=True)
    image = TF.center_crop(image, [crop_h, crop_w])
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    x = x.float().div_(255.0)
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    return (x - mean) / std


def require_rgb(model, *, what: str) -> None:
    """Refuse, in one line, a model that takes other than 3 channels: every image vitkit reads
    becomes RGB (weights of a 1-channel model load, convert and export, but cannot see files)."""
    channels = model.config.in_chans
    if channels != 3:
        raise VitkitError(f"{what}: the model takes {channels}-channel images, and vitkit reads images as RGB "
                          "(3 channels); feed it tensors from your own pipeline instead")


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files, folders (recursively, image suffixes only) and glob patterns (a folder the
    pattern matches is expanded too), in order. A name, folder or pattern that yields nothing is
    kept as it is, so that the caller reports it as a missing input instead of silently doing
    less than asked. An empty name (an unset shell variable) is an error, not the working directory."""
    import glob

    def expand(path: Path) -> list[Path]:
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [path]

    if any(not str(item).strip() for item in inputs):
        raise VitkitError("an empty image path was given (an unset variable?)")
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists() and any(ch in str(item) for ch in "*?["):
            matches = [m for p in sorted(glob.glob(str(item), recursive=True)) for m in expand(Path(p))]
        else:
            matches = expand(path)
        found.extend(matches or [path])
    return found
