"""The rendering styles of the mini world: pure numpy functions from object masks and colours to a 64x64 image."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

BASE_STYLES: tuple[str, ...] = ("flat", "soft")  # what the base model is trained on
HELDOUT_STYLES: tuple[str, ...] = ("ink", "pixel", "neon", "stripes", "watercolour")  # for style adapters

_N = 64
_Y, _X = np.mgrid[0:_N, 0:_N].astype(np.float32)
_PAPER = np.array([0.97, 0.95, 0.89], dtype=np.float32)
_INK = np.array([0.07, 0.07, 0.10], dtype=np.float32)

Masks = list[np.ndarray]
Colours = list[np.ndarray]


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (64, 64) array with edge padding."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    p = np.pad(a, r, mode="edge")
    h = sum(w * p[:, i:i + _N] for i, w in enumerate(k))  # (64 + 2r, 64)
    return sum(w * h[i:i + _N, :] for i, w in enumerate(k))


def dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Grey-level dilation of a mask by a disk of radius r pixels."""
    p = np.pad(m, r)
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r + r:
                np.maximum(out, p[r + dy:r + dy + _N, r + dx:r + dx + _N], out=out)
    return out


def erode(m: np.ndarray, r: int) -> np.ndarray:
    return 1.0 - dilate(1.0 - m, r)


def smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a cells x cells grid upsampled bicubically to 64x64."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((_N, _N), Image.BICUBIC), dtype=np.float32)


def _over(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + colour * a


def _fill(bg: np.ndarray) -> np.ndarray:
    return np.broadcast_to(bg, (_N, _N, 3)).astype(np.float32)


def flat(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Solid colours on a plain background."""
    img = _fill(bg)
    for m, c in zip(masks, colours):
        img = _over(img, c, m)
    return img


def soft(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Vertical background gradient, drop shadows and objects lit from the top left."""
    img = _fill(bg) * (1.12 - 0.24 * _Y / _N)[..., None]
    for m, c in zip(masks, colours):
        shadow = blur(np.roll(m, (2, 2), axis=(0, 1)), 1.2)
        img = img * (1.0 - 0.5 * shadow)[..., None]
        area = m.sum() + 1e-6
        cy, cx = (m * _Y).sum() / area, (m * _X).sum() / area
        d = ((_X - cx) + (_Y - cy)) / (np.sqrt(area) + 1e-6)
        shade = np.clip(1.0 - 0.9 * d, 0.55, 1.5)[..., None]
        lit = np.clip(c * shade + 0.25 * np.clip(-d, 0, None)[..., None], 0, 1)
        img = _over(img, lit, m)
    return img


def ink(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Paper-toned background, pale fills and thick black ink outlines."""
    img = _fill(0.45 * bg + 0.55 * _PAPER)
    for m, c in zip(masks, colours):
        ring = np.clip(dilate(m, 2) - m, 0, 1)
        img = _over(img, 0.8 * c + 0.2 * _PAPER, m)
        img = _over(img, _INK, ring)
    return img


def pixel(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Pixel art: a checkerboard background, 2x2 blocks and a posterised six-level palette."""
    checker = ((_X // 8 + _Y // 8) % 2 * 2 - 1)[..., None]
    img = _fill(bg) * (1.0 + 0.08 * checker)
    for m, c in zip(masks, colours):
        img = _over(img, c, m)
    small = img.reshape(_N // 2, 2, _N // 2, 2, 3).mean(axis=(1, 3))
    small = np.round(np.clip(small, 0, 1) * 5) / 5
    return small.repeat(2, axis=0).repeat(2, axis=1)


def neon(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Dark background, dim interiors and glowing bright outline tubes."""
    img = _fill(0.28 * bg)
    for m, c in zip(masks, colours):
        ring = np.clip(dilate(m, 1) - erode(m, 1), 0, 1)
        img = _over(img, 0.22 * c, m)
        img = img + 0.9 * blur(ring, 2.0)[..., None] * c
        img = _over(img, 0.65 * c + 0.35, ring)
    return img


def stripes(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Objects filled with diagonal stripes over a faintly banded background."""
    bands = (((_Y // 4) % 2) * 2 - 1)[..., None]
    img = _fill(bg) * (1.0 + 0.07 * bands)
    dark = (((_X + _Y) // 3) % 2)[..., None]
    for m, c in zip(masks, colours):
        img = _over(img, c * (1.0 - 0.5 * dark), m)
    return img


def watercolour(bg, masks: Masks, colours: Colours, rng) -> np.ndarray:
    """Washed paper background, blotchy translucent pigment with darker pooled edges and paper grain."""
    img = _fill(0.55 * bg + 0.45 * _PAPER) * (1.0 + 0.06 * smooth_noise(rng, 5))[..., None]
    for m, c in zip(masks, colours):
        wobble = smooth_noise(rng, 12)
        mw = np.clip((blur(m, 1.0) - 0.5 + 0.18 * wobble) * 2.2 + 0.5, 0, 1) * np.clip(blur(m, 2.0) * 5, 0, 1)
        edge = np.clip(mw * (1 - mw) * 4.0, 0, 1)
        pigment = (0.8 * c + 0.2 * _PAPER) * (1.0 + 0.08 * smooth_noise(rng, 6))[..., None]
        pigment = pigment * (1.0 - 0.3 * edge)[..., None]
        img = _over(img, pigment, 0.92 * mw)
    grain = rng.standard_normal((_N, _N)).astype(np.float32)
    return img * (1.0 + 0.035 * grain)[..., None]


RENDERERS: dict[str, Callable[..., np.ndarray]] = {
    "flat": flat, "soft": soft, "ink": ink, "pixel": pixel, "neon": neon, "stripes": stripes,
    "watercolour": watercolour,
}
