"""Tests for engine.images: safe loading, mode conversion, orientation, size guards, duplicates and folder scans."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.images import (
    ImageRejected,
    file_sha256,
    is_image_path,
    load_image,
    probe_image,
    scan_folder,
    to_rgb,
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_raw_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> Path:
    """A hand-built PNG; `rows=None` streams all-zero rows (used for the 12000x12000 bomb)."""
    channels = {0: 1, 2: 3}[colour_type]
    row_bytes = (width * channels * bit_depth + 7) // 8
    if rows is None:
        compressor = zlib.compressobj(9)
        zero_row = b"\x00" * (1 + row_bytes)
        idat = b"".join(compressor.compress(zero_row) for _ in range(height)) + compressor.flush()
    else:
        idat = zlib.compress(rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def write_bomb(path: Path, side: int = 12000) -> Path:
    """A valid 1-bit PNG of side x side pixels that is only ~20 KB on disk."""
    return write_raw_png(path, side, side, 1, 0, None)


def write_rgb16_png(path: Path) -> Path:
    """A 16-bit-per-channel RGB PNG: red channel full, blue half (Pillow cannot write these itself)."""
    pixels = np.zeros((8, 10, 3), dtype=">u2")
    pixels[..., 0] = 65535
    pixels[..., 2] = 32768
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(pixels.shape[0]))
    return write_raw_png(path, 10, 8, 16, 2, rows)


def write_exif_rotated(path: Path) -> Path:
    """A 40x20 JPEG, left half red and right half blue, whose EXIF says 'rotate 90 degrees clockwise to view'."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (230, 20, 20)
    array[:, 20:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def test_plain_png_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    assert image.getpixel((5, 5)) == (10, 200, 30)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    red, green, blue = load_image(path).getpixel((8, 8))
    assert red > 240 and green < 20 and blue < 20


def test_16bit_grey_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(8, axis=0).repeat(4, axis=1)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image = load_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in (0, 4, 8, 12)] == [0, 64, 128, 255]


def test_16bit_rgb_png(tmp_path: Path) -> None:
    image = load_image(write_rgb16_png(tmp_path / "rgb16.png"))
    assert image.mode == "RGB" and image.size == (10, 8)
    assert image.getpixel((0, 0)) == (255, 0, 128)


def test_alpha_and_palette_are_composited_on_white(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(rgba)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    la = tmp_path / "la.png"
    Image.new("LA", (10, 10), (0, 255)).save(la)
    assert load_image(la).getpixel((0, 0)) == (0, 0, 0)
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    pal = tmp_path / "p.png"
    palette.save(pal, transparency=0)
    assert load_image(pal).getpixel((0, 0)) == (0, 255, 0)


def test_to_rgb_float_and_int_modes() -> None:
    as_float = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert as_float.mode == "F" and to_rgb(as_float).getpixel((0, 0)) == (128, 128, 128)
    as_int = Image.fromarray(np.full((4, 4), 200, dtype=np.int32))
    assert as_int.mode == "I" and to_rgb(as_int).getpixel((0, 0)) == (200, 200, 200)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = load_image(write_exif_rotated(tmp_path / "rotated.jpg"))
    assert image.size == (20, 40)  # portrait after the transpose
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 180 and top[2] < 80, top  # the red left half is now on top
    assert bottom[2] > 180 and bottom[0] < 80, bottom


def test_truncated_jpeg_is_rejected_with_reason(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "broken.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageRejected, match="corrupt or truncated") as caught:
        load_image(path)
    assert caught.value.path == path and "broken.jpg" in str(caught.value)


def test_garbage_and_empty_files(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.jpg"
    garbage.write_text("this is not an image")
    with pytest.raises(ImageRejected, match="not a readable image"):
        load_image(garbage)
    empty = tmp_path / "empty.png"
    empty.touch()
    with pytest.raises(ImageRejected, match=r"empty file \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageRejected, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_is_rejected_from_the_header(tmp_path: Path) -> None:
    path = write_bomb(tmp_path / "huge.png")
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(ImageRejected, match=r"too large: 12000x12000 = 144\.0 MP is over the 89\.5 MP limit"):
        load_image(path)
    with pytest.raises(ImageRejected, match="decompression-bomb guard"):
        probe_image(path)
    assert time.perf_counter() - start < 1.0  # nothing was decoded


def test_large_images_are_downscaled_and_tiny_ones_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(path)
    assert load_image(path, max_side=64).size == (64, 43)
    assert load_image(path, max_side=None).size == (300, 200)
    assert probe_image(path) == (300, 200)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    with pytest.raises(ImageRejected, match="too small: 4x4"):
        load_image(tiny)
    with pytest.raises(ValueError, match="max_side must be a positive"):
        load_image(path, max_side=0)


def test_big_jpeg_uses_draft_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 1000), (40, 90, 200)).save(path, "JPEG")
    image = load_image(path, max_side=256)
    assert image.size == (256, 85)
    assert abs(image.getpixel((100, 40))[2] - 200) < 6


def test_sha256_and_scan_folder(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "b_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.new("RGB", (16, 16), (3, 2, 1)).save(tmp_path / "c.JPG")
    (tmp_path / "a.txt").write_text("existing caption")
    (tmp_path / "metadata.jsonl").write_text("")
    (tmp_path / "readme.md").write_text("hello")
    (tmp_path / "blank.webp").touch()
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "sub" / "d.png")

    assert file_sha256(tmp_path / "a.png") == file_sha256(tmp_path / "b_copy.png")
    assert file_sha256(tmp_path / "a.png") != file_sha256(tmp_path / "c.JPG")
    assert is_image_path("x.JPEG") and not is_image_path("x.txt")

    scan = scan_folder(tmp_path)
    assert [p.name for p in scan.images] == ["a.png", "c.JPG"]
    assert {p.name: o.name for p, o in scan.duplicates.items()} == {"b_copy.png": "a.png"}
    assert {p.name: why for p, why in scan.skipped.items()} == {
        "blank.webp": "empty file (0 bytes)",
        "readme.md": "not an image file (extension '.md')",
    }
    assert [p.relative_to(tmp_path).as_posix() for p in scan_folder(tmp_path, recursive=True).images] == [
        "a.png", "c.JPG", "sub/d.png"]
    with pytest.raises(ValueError, match="not a folder"):
        scan_folder(tmp_path / "a.png")
