"""Safe image loading and validation shared by captioning and the data pipeline: open, orient, convert, limit, hash."""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Files that sit next to images in a dataset folder and are never reported as "not an image".
SIDECAR_EXTENSIONS = frozenset({".txt", ".caption", ".json", ".jsonl", ".toml", ".yaml", ".yml", ".npz", ".pt"})
# Decompression-bomb guard: the same pixel budget Pillow warns at by default (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
# Images above this longest side are downscaled on load; captioners resize far below this anyway.
DEFAULT_MAX_SIDE = 2048
DEFAULT_MIN_SIDE = 8


class ImageRejected(ValueError):
    """An image file that cannot be used; `reason` is a short human-readable explanation."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass
class FolderScan:
    """The files of a dataset folder sorted into usable images, skipped files (with reasons) and duplicates."""

    folder: Path
    images: list[Path] = field(default_factory=list)
    skipped: dict[Path, str] = field(default_factory=dict)
    duplicates: dict[Path, Path] = field(default_factory=dict)  # duplicate -> first file with the same bytes


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension we load (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: identical files (exact duplicates) share it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited over `background`, 16/32-bit and float rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA" if ("transparency" in image.info or mode == "PA") else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Rescale a 16-bit, 32-bit integer or float single-channel array to uint8."""
    values = array.astype(np.float64)
    if mode == "F":
        peak = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    elif mode == "I" and values.size and values.max() <= 255:
        peak = 255.0
    else:  # 16-bit data, also what Pillow hands back as mode "I" for 16-bit PNGs
        peak = 65535.0
    return np.clip(np.nan_to_num(values) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_side: int | None = DEFAULT_MAX_SIDE,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Open, fully decode, EXIF-orient and convert an image to RGB, downscaling it to `max_side`.

    Raises ImageRejected (a ValueError) naming the file and the reason: missing, empty, not an image,
    corrupt or truncated, more than `max_pixels` pixels (decompression-bomb guard), or smaller than `min_side`.
    """
    path = Path(path)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side!r}")
    if not path.is_file():
        raise ImageRejected(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageRejected(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        # We enforce our own pixel budget below, from the header, before any decoding happens.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                _check_size(path, opened.size, max_pixels, min_side)
                if max_side is not None and opened.format == "JPEG":
                    opened.draft("RGB", (max_side, max_side))  # let libjpeg decode big photos at reduced scale
                opened.load()
                image = ImageOps.exif_transpose(opened)
                if image is opened:
                    image = opened.copy()
        except ImageRejected:
            raise
        except Image.DecompressionBombError as error:
            raise ImageRejected(path, f"too large to open safely ({error})") from error
        except UnidentifiedImageError as error:
            raise ImageRejected(path, "not a readable image (unknown or corrupt format)") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageRejected(path, f"corrupt or truncated image ({error})") from error
    image = to_rgb(image)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def _check_size(path: Path, size: tuple[int, int], max_pixels: int | None, min_side: int) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(
            path,
            f"too large: {width}x{height} = {width * height / 1e6:.1f} MP is over the "
            f"{max_pixels / 1e6:.1f} MP limit (decompression-bomb guard)",
        )
    if min(width, height) < min_side:
        raise ImageRejected(path, f"too small: {width}x{height}, the shortest side must be at least {min_side} px")


def probe_image(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> tuple[int, int]:
    """Cheap check from the header only: returns (width, height) as stored, or raises ImageRejected."""
    path = Path(path)
    if not path.is_file():
        raise ImageRejected(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageRejected(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                _check_size(path, opened.size, max_pixels, min_side)
                return opened.size
        except ImageRejected:
            raise
        except Image.DecompressionBombError as error:
            raise ImageRejected(path, f"too large to open safely ({error})") from error
        except UnidentifiedImageError as error:
            raise ImageRejected(path, "not a readable image (unknown or corrupt format)") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageRejected(path, f"corrupt image header ({error})") from error


def scan_folder(folder: str | os.PathLike, *, recursive: bool = False) -> FolderScan:
    """List a dataset folder: images by extension (SHA-256 duplicates noted), other files skipped with a reason.

    Only names and bytes are read here; decoding problems surface later from `load_image`.
    Sidecar-like files (.txt, .jsonl, ...) and hidden files are ignored silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"not a folder: {str(folder)!r}")
    scan = FolderScan(folder=root)
    seen: dict[str, Path] = {}
    candidates = root.rglob("*") if recursive else root.iterdir()
    for path in sorted(candidates):
        if path.is_dir() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        suffix = path.suffix.lower()
        if suffix in SIDECAR_EXTENSIONS:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            scan.skipped[path] = f"not an image file (extension {suffix or 'none'!r})"
            continue
        if path.stat().st_size == 0:
            scan.skipped[path] = "empty file (0 bytes)"
            continue
        digest = file_sha256(path)
        if digest in seen:
            scan.duplicates[path] = seen[digest]
        else:
            seen[digest] = path
            scan.images.append(path)
    return scan
