import io
import zlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from vitkit.images import ImageReadError, decode_image, list_images, read_image


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


GRADIENT = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # (16, 16)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_rgb_keeping_the_content(tmp_path, mode):
    base = Image.fromarray(GRADIENT).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray((GRADIENT.astype(np.uint16) * 257))
        assert image.mode.startswith("I;16")
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, fmt)
    out = read_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    gray = np.asarray(out).mean(2)
    if mode != "1":  # 1-bit dithers; every other mode keeps the left-to-right gradient
        assert np.corrcoef(gray.flatten(), GRADIENT.flatten())[0, 1] > 0.95


def test_transparency_goes_onto_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    assert np.asarray(read_image(tmp_path / "clear.png")).min() == 255
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(read_image(tmp_path / "p.png")).min() == 255


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM"])
def test_formats(tmp_path, fmt):
    image = Image.fromarray(np.dstack([GRADIENT, GRADIENT.T, 255 - GRADIENT]))
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, fmt)
    out = np.asarray(read_image(path)).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out - np.asarray(image).astype(int)).mean() < (40 if fmt in ("GIF", "JPEG", "WEBP") else 1)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = np.asarray(read_image(tmp_path / "r.jpg"))
    assert out.shape == (20, 10, 3)
    assert out[:8].mean() > 200 and out[12:].mean() < 50  # the white half is now on top


def test_tiny_and_large_images(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    assert read_image(tmp_path / "one.png").getpixel((0, 0)) == (1, 2, 3)
    Image.new("L", (4000, 3000), 7).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png").size == (4000, 3000)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge size, with a little compressed data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_broken_files_raise_a_clean_error_naming_the_file(tmp_path):
    good = _bytes(Image.fromarray(np.dstack([GRADIENT] * 3)), "JPEG")
    cases = {"empty.jpg": b"", "random.jpg": bytes(range(256)) * 4, "text.png": b"hello world",
             "cut.jpg": good[:len(good) // 3], "cut.png": _bytes(Image.new("RGB", (64, 64)), "PNG")[:60],
             "bomb.png": _png_header_only(30_000, 30_000)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError, match=name) as info:
            read_image(tmp_path / name)
        assert "\n" not in str(info.value)
    assert "decompression bomb" in str(pytest.raises(ImageReadError, read_image, tmp_path / "bomb.png").value)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="a folder, not an image file"):
        read_image(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048),
                 st.builds(lambda cut, tail: _bytes(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG")[:cut] + tail,
                           st.integers(0, 120), st.binary(max_size=64)),
                 st.builds(lambda cut: _bytes(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG")[:cut], st.integers(0, 700))))
def test_any_bytes_give_an_image_or_a_clean_error(data):
    try:
        image = decode_image(data, name="fuzz")
    except ImageReadError as error:
        assert str(error).startswith("fuzz: ")
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


def test_list_images_expands_folders_and_globs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/notes.txt", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    found = list_images([str(tmp_path / "a"), str(tmp_path / "*.png"), str(tmp_path / "gone.png")])
    assert [p.name for p in found] == ["1.png", "2.JPG", "c.png", "gone.png"]
