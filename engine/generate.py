"""Image generation: sample images during training and the prompt x seed grid across adapters (merged weights)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, steps: int, size: int, guidance: float = 7.5,
                  ) -> list[Image.Image]:
    """One image per prompt, each from its own generator seeded by `seed` (global RNG state left untouched)."""
    devices = [pipe.device] if pipe.device.type == "cuda" else []
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            return [pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                         generator=torch.Generator("cpu").manual_seed(seed)).images[0] for p in prompts]
    finally:
        unet.train(was_training)


@dataclass
class GridResult:
    """Images per column label, each list in (prompt, seed) row order; the grid PNG path when one was written."""

    labels: list[str]
    prompts: list[str]
    seeds: list[int]
    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_adapter(source: str | os.PathLike) -> Path:
    """A LoRA .safetensors file, or a run folder's final diffusers-format file."""
    path = Path(source)
    if path.is_dir():
        for name in ("lora_diffusers.safetensors", "lora_kohya.safetensors"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"run folder {str(path)!r} has no final LoRA file yet (is the run finished?)")
    if not path.is_file():
        raise ValueError(f"adapter not found: {str(source)!r} (expected a .safetensors LoRA file or a run folder)")
    return path


def _module_names(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


class merged_lora:
    """Context manager: add strength * up @ down of a LoRA file into the UNet's weights; restore them exactly on
    exit."""

    def __init__(self, unet, source: str | os.PathLike, strength: float = 1.0):
        from engine.export import load_lora_file

        self.unet, self.strength = unet, float(strength)
        lora = load_lora_file(resolve_adapter(source), module_names=_module_names(unet), unet_config=unet.config)
        modules = dict(unet.named_modules())
        self.factors = {n: f for n, f in lora.factors.items() if n in modules}
        self.skipped = sorted(set(lora.factors) - set(self.factors))
        if not self.factors:
            raise ValueError(f"{Path(source).name}: none of its layers belong to this model's UNet "
                             "(wrong base model?)")
        self.saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __enter__(self) -> merged_lora:
        for name, (up, down) in self.factors.items():
            w = self.unet.get_submodule(name).weight
            self.saved[name] = w.detach().clone()
            delta = (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32)) * self.strength
            w.copy_((w.float() + delta.reshape(w.shape)).to(w.dtype))
        return self

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        for name, w0 in self.saved.items():
            self.unet.get_submodule(name).weight.copy_(w0)
        self.saved.clear()


def generate_grid(pipe, adapters: dict[str, str | os.PathLike], prompts: list[str], seeds: list[int], *,
                  strength: float = 1.0, steps: int = 25, guidance: float = 7.5, size: int | None = None,
                  include_base: bool = True, out: str | os.PathLike | None = None) -> GridResult:
    """The same prompt x seed images for the base model and each adapter (merged weights); optional grid PNG."""
    import time

    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if not (isinstance(strength, (int, float)) and -4 <= strength <= 4):
        raise ValueError(f"strength must be a number in [-4, 4], got {strength!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    size = size or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    columns = ({"base": None} if include_base else {}) | {k: resolve_adapter(v) for k, v in adapters.items()}
    result = GridResult(list(columns), list(prompts), list(seeds))
    for label, source in columns.items():
        start = time.perf_counter()
        if source is None:
            result.images[label] = _render(pipe, prompts, seeds, steps, guidance, size)
        else:
            with merged_lora(pipe.unet, source, strength):
                result.images[label] = _render(pipe, prompts, seeds, steps, guidance, size)
        result.seconds[label] = time.perf_counter() - start
    if out is not None:
        result.path = str(save_grid(result, out))
    return result


def _render(pipe, prompts, seeds, steps, guidance, size) -> list[Image.Image]:
    return [img for p in prompts for seed in seeds
            for img in sample_images(pipe, [p], seed, steps, size, guidance)]


def save_grid(result: GridResult, out: str | os.PathLike) -> Path:
    """Columns = labels, rows = (prompt, seed); a header row of labels and a left column of row names."""
    first = next(iter(result.images.values()))[0]
    w, h = first.size
    pad, head, side = 4, 18, max(80, min(240, 7 * max(len(p) for p in result.prompts) // 2))
    rows = [(p, s) for p in result.prompts for s in result.seeds]
    grid = Image.new("RGB", (side + len(result.labels) * (w + pad), head + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(result.labels):
        draw.text((side + c * (w + pad) + 2, 3), label[: max(4, w // 6)], fill="black")
        for r, image in enumerate(result.images[label]):
            grid.paste(image.resize((w, h)), (side + c * (w + pad), head + r * (h + pad)))
    for r, (prompt, seed) in enumerate(rows):
        draw.text((2, head + r * (h + pad) + 2), f"{prompt[: side // 6]}\nseed {seed}", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    grid.save(tmp)
    os.replace(tmp, out)
    return out
