"""Engine calls of the Compare, Prune and Export tabs: adapter files, the grid job, pruning numbers and previews."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from studio import datasets as ds
from studio.jobs import Job
from studio.pruning import PruneNumbers, numbers

MAX_COLUMNS = 6


def parse_seeds(text: str) -> list[int]:
    """'0, 1 2' -> [0, 1, 2]; a readable error for anything that is not a whole number."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"seeds must be whole numbers separated by commas, got {text!r}") from None
    if not seeds:
        raise ValueError("give at least one seed")
    return seeds


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one prompt (one per line)")
    return prompts


class MediaMixin:
    """Adapter files and the jobs that render images from them (mixed into studio.engine_facade.Engine)."""

    data: Path

    def own(self, path: str) -> Path:
        """The path, refused unless it lies in the studio's data folder (API callers can send any string)."""
        return ds.inside(self.data, path)

    # --- adapter files --------------------------------------------------------------------------------------
    def adapter_choices(self) -> list[tuple[str, str]]:
        """Finished runs' LoRA files, then pruned, exported and uploaded files: (label, path)."""
        from engine import runs

        out = []
        for run in runs.list_runs(self.data / "runs"):
            if run.lora_file("diffusers").is_file():
                out.append((f"run: {run.path.name}", str(run.lora_file("diffusers"))))
        for sub in ("pruned", "adapters"):
            out += [(f"{sub}: {p.name}", str(p)) for p in sorted((self.data / sub).glob("*.safetensors"))]
        return out

    def add_adapter_file(self, path: str) -> str:
        from engine.export import load_lora_file

        src = Path(path)
        dst = self.data / "adapters" / ds.safe_name(src.name, "adapter.safetensors")
        load_lora_file(src)  # refuses pickles and non-LoRA files with a readable message
        shutil.copy2(src, dst)
        return str(dst)

    def adapter_label(self, path: str) -> str:
        p = Path(path)
        return p.parent.name if (p.parent / "config.json").is_file() else p.stem

    def base_of(self, path: str) -> str:
        """The base model an adapter was trained on: its run's config, else its file metadata, else bundled."""
        from engine import runs
        from engine.export import load_lora_file

        p = Path(path)
        run = runs.RunFolder(p if p.is_dir() else p.parent)
        if (run / runs.CONFIG).is_file():
            return run.config().get("base_model", "bundled")
        return load_lora_file(p).metadata.get("rankstudio.base_model", "bundled")

    def run_info(self, path: str) -> dict[str, Any]:
        """The config of the run that made this adapter file ({} for a standalone file)."""
        from engine import runs

        run = runs.RunFolder(Path(path).parent)
        return run.config() if (run / runs.CONFIG).is_file() else {}

    def default_prompt(self, path: str | None) -> str:
        if not path:
            return ""
        cfg = self.run_info(path)
        if cfg.get("sample_prompts"):
            return cfg["sample_prompts"][0]
        return self.first_caption(cfg["dataset"]) if cfg.get("dataset") and Path(cfg["dataset"]).is_dir() else ""

    # --- compare --------------------------------------------------------------------------------------------
    def compare(self, sources: list[str], prompts: str, seeds: str, strength: float = 1.0, steps: int = 20,
                base_model: str = "") -> Job:
        """Queue the grid: base model plus each adapter in columns, the same prompts and seeds in rows."""
        from engine.generate import generate_grid, save_grid

        if not sources:
            raise ValueError("choose at least one adapter to compare")
        if len(sources) > MAX_COLUMNS:
            raise ValueError(f"compare at most {MAX_COLUMNS} adapters at once, got {len(sources)}")
        prompt_list, seed_list = parse_prompts(prompts), parse_seeds(seeds)
        labels: dict[str, str] = {}
        for path in map(self.own, sources):
            label = self.adapter_label(path)
            labels[label if label not in labels else f"{label}-{len(labels)}"] = str(path)
        base = (base_model or "").strip() or self.base_of(sources[0])

        def run(job: Job):
            job.report("loading the base model")
            pipe = self.pipeline(base)
            job.report(f"rendering {(len(labels) + 1) * len(prompt_list) * len(seed_list)} images")
            guidance = 5.0 if base == "bundled" else 7.5  # the mini-SD follows prompts best at 5
            grid = generate_grid(pipe, labels, prompt_list, seed_list, strength=float(strength), steps=int(steps),
                                 guidance=guidance)
            shown = dataclasses.replace(grid, images={k: [enlarge(i) for i in v] for k, v in grid.images.items()})
            path = save_grid(shown, self.data / "compare" / f"grid-{job.id}.png")
            return str(path), self.compare_rows(grid, labels)

        return self.jobs.submit("compare", f"compare {', '.join(labels)}", run)

    def compare_rows(self, grid, labels: dict[str, str]) -> list[list[Any]]:
        """[[column, method, file MB, parameters, ranks min/mean/max, prompt fidelity, style fidelity]]."""
        from engine.export import load_lora_file

        oracle = _oracle()
        prompts = [p for p in grid.prompts for _ in grid.seeds]
        # the base column is scored against the style the adapters were trained on: how far each one moved it
        target = next((s for s in map(self._style_of, labels.values()) if s), None)
        rows = []
        for label in grid.labels:
            row: list[Any] = [label, "base", 0.0, 0, ""]
            if label in labels:
                lora = load_lora_file(labels[label])
                ranks = list(lora.ranks.values())
                params = sum(up.numel() + down.numel() for up, down in lora.factors.values())
                method = self.run_info(labels[label]).get("method") or lora.metadata.get("rankstudio.method", "?")
                row = [label, method, round(Path(labels[label]).stat().st_size / 2**20, 3), params,
                       f"{min(ranks)} / {sum(ranks) / len(ranks):.1f} / {max(ranks)}"]
            style = self._style_of(labels[label]) if label in labels else target
            row += _oracle_scores(oracle, grid.images[label], prompts, style)
            rows.append(row)
        return rows

    def _style_of(self, path: str | None) -> str | None:
        name = Path(self.run_info(path).get("dataset", "")).name if path else ""
        return name.removeprefix("style_") if name.startswith("style_") else None

    # --- prune ----------------------------------------------------------------------------------------------
    def prune_numbers(self, path: str, tau: float, cap: int | None = None) -> PruneNumbers:
        """Live numbers for the slider: cached spectra, then only the rank choice (milliseconds)."""
        if not path:
            raise ValueError("choose an adapter first")
        return numbers(self.prune_cache.get(self.own(path)), float(tau), int(cap) if cap else None)

    def save_pruned(self, path: str, tau: float, cap: int | None = None) -> Any:
        from engine.export import prune_file

        src = self.prune_cache.get(self.own(path))
        suffix = f"-tau{float(tau):.2f}" + (f"-cap{int(cap)}" if cap else "")
        out = self.data / "pruned" / f"{self.adapter_label(path)}{suffix}.safetensors"
        return prune_file(src.lora, out, tau=float(tau), cap=int(cap) if cap else None)

    def prune_preview(self, path: str, tau: float, cap: int | None, prompt: str, seed: int, steps: int = 20) -> Job:
        """Queue two images with the same seed: the adapter as it is, and pruned to tau / cap."""
        from engine.export import prune_file
        from engine.generate import merged_lora, sample_images
        from engine.models import native_resolution

        src = self.prune_cache.get(self.own(path))
        prompt = (prompt or "").strip() or self.default_prompt(path) or "a picture"
        base = self.base_of(path)

        def run(job: Job):
            pipe = self.pipeline(base)
            tmp = self.data / "previews" / f"preview-{job.id}{Path(path).suffix}"
            prune_file(src.lora, tmp, tau=float(tau), cap=int(cap) if cap else None)
            size = native_resolution(pipe)
            images = []
            try:
                for source in (path, tmp):
                    with merged_lora(pipe.unet, source):
                        images += sample_images(pipe, [prompt], int(seed), int(steps), size)
            finally:
                tmp.unlink(missing_ok=True)
            return [enlarge(i) for i in images]

        return self.jobs.submit("preview", f"prune preview tau={float(tau):.2f}", run)

    # --- export ---------------------------------------------------------------------------------------------
    def export_sources(self) -> list[tuple[str, str]]:
        """Finished runs (both formats) and pruned or uploaded files (their own format)."""
        from engine import runs

        out = [(f"run: {r.path.name}", str(r.path)) for r in runs.list_runs(self.data / "runs")
               if r.lora_file("kohya").is_file()]
        for sub in ("pruned", "adapters"):
            out += [(f"{sub}: {p.name}", str(p)) for p in sorted((self.data / sub).glob("*.safetensors"))]
        return out

    def export(self, source: str, fmt: str) -> tuple[str, dict[str, Any]]:
        """Copy the adapter in format `fmt` into exports/ and return its path and metadata (JSON values decoded)."""
        from engine import runs
        from engine.export import load_lora_file

        if not source:
            raise ValueError("choose a run or an adapter file first")
        src = self.own(source)
        if src.is_dir():
            name, path = src.name, runs.RunFolder(src).lora_file(fmt)
            if not path.is_file():
                raise ValueError(f"{src.name} has no {fmt} file (is the run finished?)")
        else:
            lora = load_lora_file(src)
            if lora.fmt != fmt:
                raise ValueError(f"{src.name} is a {lora.fmt} file; export the run it came from to get {fmt}")
            name, path = src.stem, src
        out = self.data / "exports" / f"{name}-{fmt}.safetensors"
        shutil.copy2(path, out)
        return str(out), metadata_view(load_lora_file(out))


def metadata_view(lora) -> dict[str, Any]:
    """File metadata with JSON strings decoded, plus a ranks summary."""
    meta: dict[str, Any] = {}
    for k, v in sorted(lora.metadata.items()):
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    ranks = list(lora.ranks.values())
    meta.pop("rankstudio.ranks", None)
    meta["layers"] = len(ranks)
    meta["ranks min/max"] = [min(ranks), max(ranks)] if ranks else []
    return meta


def enlarge(image, min_side: int = 256):
    """Small model outputs (32-64 px) scaled up with nearest-neighbour so that they are visible on screen."""
    from PIL import Image

    factor = max(1, min_side // max(1, min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _oracle():
    try:
        from engine.miniworld.oracle import Oracle

        return Oracle.load()
    except (ImportError, OSError, ValueError):
        return None


def _oracle_scores(oracle, images, prompts: list[str], style: str | None) -> list[Any]:
    """[prompt fidelity, style fidelity] from the mini-world oracle, blank where it does not apply."""
    if oracle is None:
        return ["", ""]
    out: list[Any] = []
    for score in (lambda: oracle.prompt_fidelity(images, prompts),
                  lambda: oracle.style_fidelity(images, style) if style else ""):
        try:
            value = score()
            out.append(round(value, 3) if isinstance(value, float) else value)
        except (ValueError, KeyError):
            out.append("")
    return out
