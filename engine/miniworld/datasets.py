"""Deterministic bundled data: held-out evaluation prompts and the style / subject adapter datasets.

Run `python -m engine.miniworld.datasets` to rewrite assets/eval_prompts.txt and assets/datasets/ byte for byte.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from engine.miniworld import world

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EVAL_PROMPTS_FILE = ASSETS / "eval_prompts.txt"
DATASETS_DIR = ASSETS / "datasets"
N_EVAL = 200
N_PER_DATASET = 15
EVAL_SEED = 20_251_122
# trigger word per held-out style (rare letter strings: the tokenizer spells them out character by character)
STYLE_TRIGGERS: dict[str, str] = {"ink": "zkw", "pixel": "vpx", "neon": "nqn", "stripes": "xtr", "watercolour": "wqc"}
SUBJECT_TRIGGER = "sks"


def eval_scenes(n: int = N_EVAL) -> list[world.Scene]:
    """The held-out evaluation scenes (base shapes only, all distinct); the recipe never trains on them."""
    unique: dict[str, world.Scene] = {}
    for scene in world.sample_scenes(EVAL_SEED, 2 * n):
        unique.setdefault(scene.key(), scene)
        if len(unique) == n:
            break
    return list(unique.values())


def eval_prompts(n: int = N_EVAL) -> list[str]:
    """Style-free evaluation prompts; prefix 'flat style, ' (base) or '<trigger> style, ' (adapter) to use them."""
    return [s.caption() for s in eval_scenes(n)]


def base_style_prompts(n: int = N_EVAL) -> list[str]:
    """The evaluation prompts in the base styles, alternating flat and soft."""
    return [s.caption(style=world.BASE_STYLES[i % len(world.BASE_STYLES)]) for i, s in enumerate(eval_scenes(n))]


def eval_keys() -> set[str]:
    return {s.key() for s in eval_scenes()}


def style_dataset(style: str, n: int = N_PER_DATASET) -> list[tuple[world.Scene, str]]:
    """(scene, caption) pairs for one held-out style; captions start with '<trigger> style'."""
    if style not in STYLE_TRIGGERS:
        raise ValueError(f"{style!r} is not a held-out style; expected one of {tuple(STYLE_TRIGGERS)}")
    seed = 1000 + world.STYLES.index(style)
    scenes = world.sample_scenes(seed, n, exclude=eval_keys())
    return [(s, s.caption(trigger=f"{STYLE_TRIGGERS[style]} style")) for s in scenes]


def subject_scenes(seed: int, n: int, exclude: set[str] | None = None) -> list[world.Scene]:
    """Scenes holding the held-out subject (the moon) in one slot, sometimes beside one base-shape object."""
    out = []
    for s in world.sample_scenes(seed, 4 * n + 8, exclude=exclude):
        first = s.objects[0]
        moon = world.Obj(world.HELDOUT_SHAPE, first.colour, first.size, first.position)
        out.append(world.Scene((moon,) + s.objects[1:], s.background))
        if len(out) == n:
            break
    return out


def subject_dataset(n: int = N_PER_DATASET) -> list[tuple[world.Scene, str, str]]:
    """(scene, base style, caption) for the held-out subject, rendered in the base styles."""
    scenes = subject_scenes(2000, n, exclude=eval_keys())
    return [(s, world.BASE_STYLES[i % 2], s.caption(trigger=SUBJECT_TRIGGER)) for i, s in enumerate(scenes)]


def subject_eval_prompts(n: int = 50) -> list[str]:
    """Held-out prompts for the subject adapter: scenes with the moon never in its dataset."""
    train = {s.key() for s, _, _ in subject_dataset()}
    return [s.caption(trigger=SUBJECT_TRIGGER) for s in subject_scenes(EVAL_SEED + 1, n, exclude=train)]


def write_all(assets: Path = ASSETS) -> list[Path]:
    """Write the eval prompts and every dataset folder under `assets`; returns the paths written."""
    written = []
    prompts_file = assets / "eval_prompts.txt"
    prompts_file.write_text("\n".join(eval_prompts()) + "\n")
    written.append(prompts_file)
    root = assets / "datasets"
    items: dict[str, list[tuple[world.Scene, str, str]]] = {
        f"style_{style}": [(s, style, c) for s, c in style_dataset(style)] for style in STYLE_TRIGGERS}
    items["subject_moon"] = subject_dataset()
    for name, rows in items.items():
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for i, (scene, style, caption) in enumerate(rows):
            world.render(scene, style).save(folder / f"{i:02d}.png", optimize=True)
            (folder / f"{i:02d}.txt").write_text(caption + "\n")
            written += [folder / f"{i:02d}.png", folder / f"{i:02d}.txt"]
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=Path, default=ASSETS, help="assets folder to write into")
    args = ap.parse_args(argv)
    paths = write_all(args.assets)
    print(f"wrote {len(paths)} files under {args.assets}")


if __name__ == "__main__":
    main()
