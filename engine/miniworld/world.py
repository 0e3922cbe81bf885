"""The mini world's scenes: a caption grammar, a deterministic sampler and the 64x64 renderer of its styles."""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from engine.miniworld import styles as _styles

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
HELDOUT_SHAPE = "moon"  # the subject the base model never sees (DreamBooth-style personalisation)
ALL_SHAPES: tuple[str, ...] = SHAPES + (HELDOUT_SHAPE,)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 40, 40),
    "orange": (246, 138, 20),
    "yellow": (246, 222, 40),
    "green": (40, 190, 64),
    "blue": (40, 84, 232),
    "purple": (142, 60, 204),
    "pink": (246, 122, 196),
    "white": (246, 246, 246),
}
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "night": (24, 30, 62),
    "grass": (58, 92, 40),
    "sand": (204, 182, 132),
    "sky": (128, 188, 236),
}
BASE_STYLES: tuple[str, ...] = _styles.BASE_STYLES
HELDOUT_STYLES: tuple[str, ...] = _styles.HELDOUT_STYLES
STYLES: tuple[str, ...] = BASE_STYLES + HELDOUT_STYLES

RESOLUTION = 64
_SS = 4  # supersampling factor for clean edges
_CENTRES = {"left": (11.0, 32.0), "right": (53.0, 32.0), "top": (32.0, 11.0), "bottom": (32.0, 53.0),
            "center": (32.0, 32.0)}
_RADIUS = {"small": 6.0, "big": 10.0}
_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
_PHRASE_TO_POS = {v: k for k, v in _PHRASE.items()}


@dataclass(frozen=True)
class Obj:
    """One object of a scene: what it is and which of the five slots it sits in."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, ALL_SHAPES, "shape"), (self.colour, tuple(COLOURS), "colour"),
                                     (self.size, SIZES, "size"), (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {_PHRASE[self.position]}"


@dataclass(frozen=True)
class Scene:
    """A scene: objects at distinct positions (kept in canonical position order) on a background."""

    objects: tuple[Obj, ...]
    background: str

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {tuple(BACKGROUNDS)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects must sit at distinct positions, got {positions}")
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)

    def caption(self, style: str | None = None, trigger: str | None = None) -> str:
        """The caption: "[trigger, ][style style, ]a big red star on the left[ and ...], sky background".

        The same scene always gives the same text; parse_caption reads it back."""
        parts = []
        if trigger:
            parts.append(trigger)
        if style:
            parts.append(f"{style} style")
        if self.objects:
            parts.append(" and ".join(o.phrase() for o in self.objects))
        else:
            parts.append("nothing")
        parts.append(f"{self.background} background")
        return ", ".join(parts)

    def slot(self, position: str) -> Obj | None:
        return next((o for o in self.objects if o.position == position), None)

    def key(self) -> str:
        """The style-free caption: two scenes are the same scene exactly when their keys are equal."""
        return self.caption()


_OBJ_RE = re.compile(r"^an? (\w+) (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the center)$")


def parse_caption(text: str) -> Scene:
    """Read a caption of the grammar back into a Scene; trigger words and the style part are skipped."""
    parts = [p.strip() for p in text.strip().lower().split(",") if p.strip()]
    background, objects = None, None
    for part in parts:
        if part.endswith(" background") and part.split()[0] in BACKGROUNDS:
            background = part.split()[0]
        elif part == "nothing":
            objects = []
        elif part.startswith(("a ", "an ")) and objects is None:
            found = []
            for phrase in part.split(" and "):
                m = _OBJ_RE.match(phrase.strip())
                if m is None:
                    raise ValueError(f"cannot parse object phrase {phrase!r} in caption {text!r}")
                size, colour, shape, where = m.groups()
                found.append(Obj(shape, colour, size, _PHRASE_TO_POS[where]))
            objects = found
    if background is None or objects is None:
        raise ValueError(f"caption {text!r} has no objects part or no background part")
    return Scene(tuple(objects), background)


def caption_style(text: str) -> str | None:
    """The style named in a caption ('flat style, ...' -> 'flat'), or None."""
    for part in text.lower().split(","):
        words = part.split()
        if len(words) == 2 and words[1] == "style" and words[0] in STYLES:
            return words[0]
    return None


def sample_scenes(seed: int, n: int, shapes: tuple[str, ...] = SHAPES, n_objects: tuple[int, ...] = (1, 2),
                  p_objects: tuple[float, ...] | None = None, exclude: set[str] | None = None) -> list[Scene]:
    """n scenes drawn with numpy's generator from `seed`; scenes whose key is in `exclude` are skipped."""
    rng = np.random.default_rng(seed)
    p = np.asarray(p_objects if p_objects is not None else [0.4, 0.6][: len(n_objects)] if n_objects == (1, 2)
                   else [1.0 / len(n_objects)] * len(n_objects), dtype=float)
    colours, backgrounds = tuple(COLOURS), tuple(BACKGROUNDS)
    out: list[Scene] = []
    while len(out) < n:
        k = int(rng.choice(n_objects, p=p / p.sum()))
        positions = rng.permutation(len(POSITIONS))[:k]
        objs = tuple(Obj(shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))],
                         SIZES[rng.integers(len(SIZES))], POSITIONS[i]) for i in positions)
        scene = Scene(objs, backgrounds[rng.integers(len(backgrounds))])
        if exclude is None or scene.key() not in exclude:
            out.append(scene)
    return out


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        cy += 0.15 * r
        return [(cx + 1.1 * r * np.sin(a), cy - 1.1 * r * np.cos(a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
    if shape == "star":
        return [(cx + rr * np.sin(a), cy - rr * np.cos(a))
                for i in range(10) for a, rr in [(i * np.pi / 5, r * 1.1 if i % 2 == 0 else r * 0.45)]]
    if shape == "cross":
        w = 0.34 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"no polygon for shape {shape!r}")


def object_mask(obj: Obj) -> np.ndarray:
    """(64, 64) float32 coverage of one object in [0, 1], drawn 4x larger and box-downsampled."""
    size = RESOLUTION * _SS
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = (c * _SS for c in _CENTRES[obj.position])
    r = _RADIUS[obj.size] * _SS
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif obj.shape == "moon":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        dx, dy = 0.5 * r, -0.25 * r
        draw.ellipse((cx - 0.85 * r + dx, cy - 0.85 * r + dy, cx + 0.85 * r + dx, cy + 0.85 * r + dy), fill=0)
    else:
        draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=255)
    return np.asarray(canvas.reduce(_SS), dtype=np.float32) / 255.0


def scene_seed(scene: Scene, style: str) -> int:
    """A stable per-(scene, style) seed for textured styles, so rendering is a pure function."""
    return zlib.crc32(f"{style}|{scene.key()}".encode())


def render_array(scene: Scene, style: str = "flat") -> np.ndarray:
    """(64, 64, 3) uint8 rendering of `scene` in `style`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    masks = [object_mask(o) for o in scene.objects]
    colours = [np.asarray(COLOURS[o.colour], dtype=np.float32) / 255.0 for o in scene.objects]
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) / 255.0
    rng = np.random.default_rng(scene_seed(scene, style))
    img = _styles.RENDERERS[style](bg, masks, colours, rng)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render(scene: Scene, style: str = "flat") -> Image.Image:
    """The 64x64 RGB PIL image of `scene` in `style` (deterministic)."""
    return Image.fromarray(render_array(scene, style))


def render_batch(scenes: list[Scene], styles: list[str] | str) -> np.ndarray:
    """(N, 64, 64, 3) uint8 renderings; `styles` is one style or one per scene."""
    styles = [styles] * len(scenes) if isinstance(styles, str) else list(styles)
    out = np.empty((len(scenes), RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for i, (scene, style) in enumerate(zip(scenes, styles)):
        out[i] = render_array(scene, style)
    return out
