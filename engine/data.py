"""Training datasets: validated image folders with captions, aspect-ratio buckets, flips and latent/text caches."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine import captions as caps
from engine import images as imgs
from engine.models import model_family


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says why and names the problem files."""


@dataclass(frozen=True)
class Example:
    """One usable training image: its file, final caption (trigger included) and oriented size."""

    path: Path
    caption: str
    width: int
    height: int


@dataclass
class DatasetReport:
    """Usable examples plus every skipped file with the reason, and notes that did not stop an image."""

    folder: Path
    examples: list[Example] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    captions_from: str = "txt"

    def summary(self) -> str:
        lines = [f"{len(self.examples)} usable image(s) in {self.folder} (captions from {self.captions_from})"]
        lines += [f"  skipped {name}: {why}" for name, why in sorted(self.problems.items())]
        lines += [f"  note {name}: {why}" for name, why in sorted(self.notes.items())]
        return "\n".join(lines)


DATASETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "datasets"


def bundled_datasets() -> list[str]:
    """Names of the datasets shipped in assets/datasets (usable wherever a dataset folder is asked for)."""
    return sorted(p.name for p in DATASETS_DIR.iterdir() if p.is_dir()) if DATASETS_DIR.is_dir() else []


def resolve_dataset(folder: str | Path) -> Path:
    """A dataset folder path; a bare bundled name (style_ink) resolves to assets/datasets/<name>."""
    path = Path(folder)
    if not path.is_dir() and len(path.parts) == 1 and (DATASETS_DIR / path.name).is_dir():
        return DATASETS_DIR / path.name
    return path


def scan_dataset(folder: str | Path, trigger: str = "", *, min_side: int = 8) -> DatasetReport:
    """Validate every image of a dataset folder up front (decode, orient, size) and attach captions.

    Captions come from `metadata.jsonl` (Hugging Face imagefolder) when present, else from same-name `.txt`
    files; an image without a caption trains on the trigger word alone (noted, not skipped).
    """
    root = resolve_dataset(folder)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {str(folder)!r} (bundled: {', '.join(bundled_datasets())})")
    meta = root / caps.METADATA_FILE
    table = caps.import_metadata(meta) if meta.is_file() else None
    scan = imgs.scan_folder(root, recursive=table is not None)
    report = DatasetReport(root, captions_from=caps.METADATA_FILE if table is not None else "txt")
    report.problems.update({p.relative_to(root).as_posix(): why for p, why in scan.skipped.items()})
    report.problems.update({p.relative_to(root).as_posix(): f"duplicate of {q.name}"
                            for p, q in scan.duplicates.items()})
    for path in scan.images:
        name = path.relative_to(root).as_posix()
        try:
            with imgs.load_image(path, min_side=min_side, max_side=None) as image:
                width, height = image.size
        except imgs.ImageRejected as e:
            report.problems[name] = e.reason
            continue
        text = table.get(name) if table is not None else caps.read_caption(path)
        if not text:
            report.notes[name] = "no caption: trained on the trigger word alone" if trigger else "no caption"
            text = ""
        if trigger:
            text = caps.add_trigger(text, trigger) if text else trigger
        report.examples.append(Example(path, text, width, height))
    return report


def require_usable(report: DatasetReport) -> list[Example]:
    """The examples, or a DatasetError explaining why there are none."""
    if report.examples:
        return report.examples
    if not report.problems:
        raise DatasetError(f"no images in {str(report.folder)!r}: add .png/.jpg/.webp files (with same-name .txt "
                           "captions or a metadata.jsonl)")
    shown = "; ".join(f"{n}: {w}" for n, w in sorted(report.problems.items())[:8])
    raise DatasetError(f"no usable images in {str(report.folder)!r}: all {len(report.problems)} file(s) were "
                       f"rejected ({shown})")


# --- buckets ------------------------------------------------------------------------------------------------
def make_buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes, multiples of `multiple`, with about resolution^2 pixels and aspect <= max_ratio."""
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} (at least {multiple}), got {resolution!r}")
    area, sizes = resolution * resolution, {(resolution, resolution)}
    w = resolution
    while True:
        w += multiple
        h = (area // w) // multiple * multiple
        if h < multiple or w / h > max_ratio:
            break
        sizes |= {(w, h), (h, w)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_image(image: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover `size` then centre-crop; returns a (3, H, W) tensor in [-1, 1] and the crop's (top, left)."""
    tw, th = size
    scale = max(tw / image.width, th / image.height)
    rw, rh = max(tw, round(image.width * scale)), max(th, round(image.height * scale))
    image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - th) // 2, (rw - tw) // 2
    image = image.crop((left, top, left + tw, top + th))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0, (top, left)


# --- caches -------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """Cached latents (and flipped latents), text conditioning per caption, and bucket groups of the examples."""

    examples: list[Example]
    latents: list[torch.Tensor]
    flipped: list[torch.Tensor] | None
    caption_index: list[int]
    text: torch.Tensor  # (n_captions, L, D)
    pooled: torch.Tensor | None  # SDXL (n_captions, D2)
    time_ids: torch.Tensor | None  # SDXL (n_examples, 6)
    buckets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.examples)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, repeats: int = 1) -> list[list[tuple[int, bool]]]:
        """The epoch's micro-batches as (example index, flip) lists: one bucket per batch, seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.buckets):
            groups.setdefault(b, []).extend([i] * repeats)
        batches = []
        for key in sorted(groups):
            items = groups[key]
            order = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
            batches += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        flips = torch.rand(sum(map(len, batches)), generator=g).lt(0.5).tolist()
        out, n = [], 0
        for batch in batches:
            out.append([(i, bool(flips[n + k]) and self.flipped is not None) for k, i in enumerate(batch)])
            n += len(batch)
        return out

    def batches_per_epoch(self, batch_size: int, repeats: int = 1) -> int:
        counts: dict[tuple[int, int], int] = {}
        for b in self.buckets:
            counts[b] = counts.get(b, 0) + repeats
        return sum(math.ceil(c / batch_size) for c in counts.values())

    def collate(self, batch: list[tuple[int, bool]], device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors of one micro-batch on `device`: latents, encoder_hidden_states and SDXL's added conditioning."""
        # stacks of rows already on the device: no host-to-device copy, which would wait for the GPU to drain
        caps = [self.caption_index[i] for i, _ in batch]
        out = {"latents": torch.stack([(self.flipped[i] if f else self.latents[i]) for i, f in batch]).to(device),
               "text": torch.stack([self.text[j] for j in caps]).to(device)}
        if self.pooled is not None:
            out["text_embeds"] = torch.stack([self.pooled[j] for j in caps]).to(device)
            out["time_ids"] = torch.stack([self.time_ids[i] for i, _ in batch]).to(device)
        return out


@torch.no_grad()
def encode_captions(pipe, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds (N, L, D), pooled (N, D2) or None) from the pipeline's own text encoder(s), left on `device`: a copy
    from host memory at every step would wait for the GPU to drain (0.3 MB per SDXL caption)."""
    if model_family(pipe) == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds, None


@torch.no_grad()
def build_cache(pipe, examples: list[Example], resolution: int, multiple: int, *, buckets: bool = True,
                flip: bool = False, device: torch.device | str = "cpu", batch_size: int = 8) -> TrainData:
    """Encode every example once with the VAE (mean latents, also flipped if asked) and every caption once."""
    device = torch.device(device)
    sizes = make_buckets(resolution, multiple) if buckets else [(resolution, resolution)]
    chosen = [nearest_bucket(e.width, e.height, sizes) for e in examples]
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    vae_dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    latents, flipped, time_ids = [None] * len(examples), ([None] * len(examples) if flip else None), []
    for start in range(0, len(examples), batch_size):
        part = list(range(start, min(start + batch_size, len(examples))))
        for i in part:
            with imgs.load_image(examples[i].path, max_side=None, min_side=1) as image:
                pixels, (top, left) = fit_image(image, chosen[i])
            time_ids.append([examples[i].height, examples[i].width, top, left, chosen[i][1], chosen[i][0]])
            x = pixels[None].to(device, vae_dtype)
            latents[i] = _encode(vae, x)  # kept on the training device (a few MB for a style dataset)
            if flip:
                flipped[i] = _encode(vae, x.flip(-1))
    if upcast:
        vae.to(torch.float16)
    unique = sorted({e.caption for e in examples})
    text, pooled = encode_captions(pipe, unique, device)
    where = {c: j for j, c in enumerate(unique)}
    return TrainData(examples, latents, flipped, [where[e.caption] for e in examples], text, pooled,
                     torch.tensor(time_ids, dtype=torch.float32, device=device) if pooled is not None else None,
                     chosen)


def _encode(vae, x: torch.Tensor) -> torch.Tensor:
    dist = vae.encode(x).latent_dist
    lat = dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((lat - shift) * vae.config.scaling_factor)[0].float()
