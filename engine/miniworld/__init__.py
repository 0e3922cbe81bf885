"""The bundled mini world: procedural scenes and styles, the oracle scorer and the mini-SD recipe."""
from __future__ import annotations

from engine.miniworld.world import (
    ALL_SHAPES,
    BACKGROUNDS,
    BASE_STYLES,
    COLOURS,
    HELDOUT_SHAPE,
    HELDOUT_STYLES,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Obj,
    Scene,
    caption_style,
    parse_caption,
    render,
    sample_scenes,
)

__all__ = ["ALL_SHAPES", "BACKGROUNDS", "BASE_STYLES", "COLOURS", "HELDOUT_SHAPE", "HELDOUT_STYLES", "POSITIONS",
           "SHAPES", "SIZES", "STYLES", "Obj", "Scene", "caption_style", "parse_caption", "render", "sample_scenes"]
