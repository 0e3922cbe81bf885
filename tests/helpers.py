"""Shared test fixtures: tiny random-weight SD/SDXL pipelines saved as diffusers folders, and tiny image datasets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "big"]


def tiny_pipeline(sdxl: bool = False, seed: int = 0):
    """A StableDiffusion(XL)Pipeline with tiny random weights (32 px images, 16x16 latents), built from config."""
    return tiny_sdxl_pipeline(seed) if sdxl else tiny_sd_pipeline(seed)


def save_tiny_pipeline(folder: str | os.PathLike, sdxl: bool = False, seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder (safetensors) that load_pipeline accepts; returns the folder."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        tiny_pipeline(sdxl, seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_image_folder(folder: str | os.PathLike, n: int = 4, size: int = 32, seed: int = 0, captions: bool = True,
                      sizes: list[tuple[int, int]] | None = None, metadata: bool = False) -> Path:
    """n random-blob RGB PNGs with .txt captions (or a metadata.jsonl) made of tiny-tokenizer words."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)] if sizes else (size, size)
        base = rng.integers(0, 255, 3)
        img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        name = f"img{i:02d}.png"
        Image.fromarray(img).save(folder / name)
        text = " ".join(rng.choice(WORDS, 3))
        if metadata:
            rows.append(json.dumps({"file_name": name, "text": text}))
        elif captions:
            (folder / f"img{i:02d}.txt").write_text(text + "\n")
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m engine ARGS in the repo root, offline and single-threaded like the tests."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def adapter_tensors(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter.safetensors"))
