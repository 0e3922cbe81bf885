"""The oracle: a small CNN that reads a mini-world image back into a Scene and a style, and the world's metrics."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.miniworld import world
from engine.miniworld.world import Obj, Scene

ORACLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "oracle"
SLOT_SHAPES: tuple[str, ...] = ("empty",) + world.ALL_SHAPES
COLOURS: tuple[str, ...] = tuple(world.COLOURS)
BACKGROUNDS: tuple[str, ...] = tuple(world.BACKGROUNDS)
# logits layout: background | style | per position: shape (incl. empty), colour, size
_HEADS = [("background", len(BACKGROUNDS)), ("style", len(world.STYLES))] + [
    (f"{p}.{k}", n) for p in world.POSITIONS
    for k, n in (("shape", len(SLOT_SHAPES)), ("colour", len(COLOURS)), ("size", len(world.SIZES)))]


def head_slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, n in _HEADS:
        out[name] = slice(start, start + n)
        start += n
    return out


class OracleNet(nn.Module):
    """Four conv stages (64 -> 4 px) and a shared MLP feeding every attribute head; about 1M parameters."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 96, 128), hidden: int = 256) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        n_out = sum(n for _, n in _HEADS)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, hidden), nn.SiLU(), nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 64, 64) in [-1, 1] -> (B, n_out)
        return self.head(self.features(x))


def scene_targets(scene: Scene, style: str) -> list[int]:
    """Class indices for every head (colour/size of an empty slot are -100: ignored by the loss)."""
    t = [BACKGROUNDS.index(scene.background), world.STYLES.index(style)]
    for p in world.POSITIONS:
        o = scene.slot(p)
        t += [0, -100, -100] if o is None else [SLOT_SHAPES.index(o.shape), COLOURS.index(o.colour),
                                                world.SIZES.index(o.size)]
    return t


def oracle_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy; `targets` is (B, n_heads) of class indices."""
    loss = logits.new_zeros(())
    for j, sl in enumerate(head_slices().values()):
        loss = loss + nn.functional.cross_entropy(logits[:, sl].float(), targets[:, j], ignore_index=-100)
    return loss


def to_tensor(images: list | np.ndarray) -> torch.Tensor:
    """PIL images, (64, 64, 3) uint8 arrays or one (N, 64, 64, 3) uint8 array -> (N, 3, 64, 64) float in [-1, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([im if isinstance(im, np.ndarray)
                           else np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR)) for im in images])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class Reading:
    """What the oracle saw in one image."""

    scene: Scene
    style: str
    style_probs: dict[str, float]


class Oracle:
    """Reads scenes and styles from images; scores prompt fidelity, style fidelity and memorisation."""

    def __init__(self, net: OracleNet, device: str = "cpu") -> None:
        self.net = net.to(device).eval()
        self.device = device

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu") -> Oracle:
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else ORACLE_DIR
        if not (folder / "oracle.safetensors").is_file():
            raise FileNotFoundError(f"no oracle weights at {folder / 'oracle.safetensors'}")
        cfg = json.loads((folder / "config.json").read_text())
        net = OracleNet(tuple(cfg["widths"]), cfg["hidden"])
        net.load_state_dict({k: v.float() for k, v in load_file(str(folder / "oracle.safetensors")).items()})
        return cls(net, device)

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> torch.Tensor:
        x = to_tensor(images)
        return torch.cat([self.net(x[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, 1)

    def readings(self, images) -> list[Reading]:
        lg, sl = self.logits(images), head_slices()
        out = []
        for row in lg:
            objs = []
            for p in world.POSITIONS:
                shape = SLOT_SHAPES[int(row[sl[f"{p}.shape"]].argmax())]
                if shape != "empty":
                    objs.append(Obj(shape, COLOURS[int(row[sl[f"{p}.colour"]].argmax())],
                                    world.SIZES[int(row[sl[f"{p}.size"]].argmax())], p))
            probs = torch.softmax(row[sl["style"]], 0)
            out.append(Reading(Scene(tuple(objs), BACKGROUNDS[int(row[sl["background"]].argmax())]),
                               world.STYLES[int(probs.argmax())], dict(zip(world.STYLES, probs.tolist()))))
        return out

    def read(self, images) -> list[Scene]:
        """The scene the oracle reads in each image."""
        return [r.scene for r in self.readings(images)]

    def style_probs(self, images) -> np.ndarray:
        """(N, len(STYLES)) style probabilities, columns in world.STYLES order."""
        lg = self.logits(images)
        return torch.softmax(lg[:, head_slices()["style"]], 1).numpy() if len(lg) else np.zeros((0, len(world.STYLES)))

    def prompt_fidelity(self, images, prompts: list[str]) -> float:
        """Mean over prompts of the fraction of the prompt's attributes present (background; per object: shape,
        colour and size at its position); styles and trigger words are not attributes."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return float(np.mean([attribute_match(world.parse_caption(p), s)
                              for p, s in zip(prompts, self.read(images))]))

    def style_fidelity(self, images, style: str) -> float:
        """Mean probability the oracle gives to `style`."""
        if style not in world.STYLES:
            raise ValueError(f"unknown style {style!r}; expected one of {world.STYLES}")
        return float(self.style_probs(images)[:, world.STYLES.index(style)].mean())

    @staticmethod
    def memorisation(images, train_images) -> float:
        """Mean over `images` of the RMS pixel distance (0..1 scale) to the nearest of `train_images`:
        near 0 means copies of the training set."""
        a = (to_tensor(images).flatten(1) + 1) / 2
        b = (to_tensor(train_images).flatten(1) + 1) / 2
        d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
        return float((d2.clamp_min(0).min(1).values / a.shape[1]).sqrt().mean())


def attribute_match(want: Scene, got: Scene) -> float:
    """Fraction of `want`'s attributes found in `got`: background, then shape/colour/size per wanted object."""
    hits, total = int(want.background == got.background), 1
    for o in want.objects:
        g = got.slot(o.position)
        total += 3
        if g is not None:
            hits += (g.shape == o.shape) + (g.colour == o.colour) + (g.size == o.size)
    return hits / total


def slot_accuracy(want: Scene, got: Scene) -> float:
    """Fraction of the five slots read exactly (empty where empty, same object where not) - catches extras."""
    return float(np.mean([want.slot(p) == got.slot(p) for p in world.POSITIONS]))
