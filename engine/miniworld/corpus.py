"""Large rendered corpora for the recipe: scenes drawn and rendered in parallel worker processes (numpy only)."""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass

import numpy as np

from engine.miniworld import world

_EXCLUDE: set[str] = set()
CHUNK = 2000


@dataclass
class Corpus:
    """images (N, 64, 64, 3) uint8; keys: style-free captions; styles: style index into world.STYLES per image."""

    images: np.ndarray
    keys: list[str]
    styles: np.ndarray
    targets: np.ndarray | None  # (N, n_heads) oracle class indices, when asked for


def _init(exclude: set[str]) -> None:
    global _EXCLUDE
    _EXCLUDE = exclude


def _chunk(job: tuple) -> tuple:
    seed, n, shapes, styles, n_objects, p_objects, with_targets = job
    scenes = world.sample_scenes(seed, n, shapes=shapes, n_objects=n_objects, p_objects=p_objects,
                                 exclude=_EXCLUDE or None)
    rng = np.random.default_rng(seed + 7_919)
    style_idx = rng.integers(len(styles), size=n)
    names = [styles[i] for i in style_idx]
    images = world.render_batch(scenes, names)
    targets = None
    if with_targets:
        from engine.miniworld.oracle import scene_targets  # torch-free at module level is not needed here

        targets = np.asarray([scene_targets(s, st) for s, st in zip(scenes, names)], dtype=np.int64)
    return images, [s.key() for s in scenes], np.asarray([world.STYLES.index(s) for s in names]), targets


def render_corpus(seed: int, n: int, shapes: tuple[str, ...] = world.SHAPES, styles: tuple[str, ...] = world.STYLES,
                  n_objects: tuple[int, ...] = (1, 2), p_objects: tuple[float, ...] | None = None,
                  exclude: set[str] | None = None, workers: int = 1, with_targets: bool = False) -> Corpus:
    """n rendered (image, caption key, style) triples; chunk i uses seed*100_003 + i, so the result does not
    depend on the number of workers."""
    jobs = [(seed * 100_003 + i, min(CHUNK, n - i * CHUNK), shapes, styles, n_objects, p_objects, with_targets)
            for i in range((n + CHUNK - 1) // CHUNK)]
    exclude = exclude or set()
    if workers > 1:
        with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(exclude,)) as pool:
            parts = pool.map(_chunk, jobs, chunksize=1)
    else:
        _init(exclude)
        parts = [_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    keys = [k for p in parts for k in p[1]]
    styles_idx = np.concatenate([p[2] for p in parts])
    targets = np.concatenate([p[3] for p in parts]) if with_targets else None
    return Corpus(images, keys, styles_idx, targets)
