"""Load base pipelines (bundled mini-SD, SD1.x/2.x, SDXL) from a hub id, a local folder or a single safetensors
file."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUNDLED = "bundled"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
SD_CLASSES = ("StableDiffusionPipeline",)
SDXL_CLASSES = ("StableDiffusionXLPipeline",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A base model that cannot be loaded; the message names the model and says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a base model comes from: kind is bundled, folder, file or hub; family is sd or sdxl (None: unknown)."""

    kind: str
    location: str
    family: str | None = None


def bundled_path() -> Path:
    """The bundled mini Stable Diffusion folder (assets/mini-sd, or $RANKSTUDIO_MINI_SD)."""
    env = os.environ.get("RANKSTUDIO_MINI_SD")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "mini-sd"


def family_of_folder(folder: Path) -> str:
    """sd or sdxl from a diffusers folder's model_index.json."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{str(folder)!r} is not a diffusers pipeline folder (no model_index.json); pass a "
                             "folder saved with save_pretrained, a .safetensors checkpoint file, or a hub id")
    return _family_of_index(json.loads(index.read_text()), str(folder))


def _family_of_index(index: dict[str, Any], name: str) -> str:
    cls = index.get("_class_name", "")
    if cls in SDXL_CLASSES or "text_encoder_2" in index:
        return "sdxl"
    if cls in SD_CLASSES or "text_encoder" in index:
        return "sd"
    raise ModelLoadError(f"{name}: unsupported pipeline {cls!r}; the studio trains Stable Diffusion 1.x/2.x and SDXL")


def family_of_file(path: Path) -> str:
    """sd or sdxl from the tensor names of a single-file (original layout) checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for bad headers)
        raise ModelLoadError(f"{path.name}: not a readable safetensors file ({e})") from None
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd"
    raise ModelLoadError(f"{path.name}: not a Stable Diffusion checkpoint in the original single-file layout "
                         "(no model.diffusion_model.* weights)")


def resolve_spec(spec: str) -> ModelSpec:
    """Classify a model spec string; refuses pickled checkpoints and malformed names with a ValueError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"base model must be 'bundled', a hub id, a folder or a .safetensors file, got {spec!r}")
    spec = spec.strip()
    if spec == BUNDLED:
        folder = bundled_path()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"the bundled mini model is missing at {str(folder)!r}; build it with the miniworld "
                                 "recipe (python -m engine.miniworld.recipe) or pass another base model")
        return ModelSpec("bundled", str(folder), "sd")
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: {path.suffix} checkpoints are pickles that can run code when loaded; "
                             "convert it to .safetensors first (or use the diffusers folder of the model)")
    if path.is_dir():
        return ModelSpec("folder", str(path), family_of_folder(path))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{path.name}: single-file models must be .safetensors")
        return ModelSpec("file", str(path), family_of_file(path))
    if path.is_absolute() or spec.startswith((".", "~")) or path.suffix.lower() == ".safetensors" \
            or not _HUB_ID.match(spec):
        raise ModelLoadError(f"base model {spec!r}: no such folder or file (and not a hub id like org/name)")
    return ModelSpec("hub", spec, None)


def _offline_error(name: str, error: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the base model {name!r} ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
        "If it is a hub model, it is not in the local cache and the hub cannot be reached: download it on a connected "
        f"machine (huggingface-cli download {name}), copy the folder here and pass its path, or use the bundled "
        "model ('bundled').")


def _hub_family(repo: str, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(repo, "model_index.json", local_files_only=local_only)
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, gated: all the same advice)
        raise _offline_error(repo, e) from None
    return _family_of_index(json.loads(Path(index).read_text()), repo)


def _dtype_kwarg() -> str:
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def load_pipeline(spec: str = BUNDLED, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                  local_files_only: bool | None = None, config: str | None = None):
    """A StableDiffusion(XL)Pipeline in `dtype` on `device` (safetensors only, progress bar off, no safety checker).

    `config`: for a single .safetensors file, a local diffusers folder of the same architecture to take the
    component configs from (so that loading works offline).
    """
    model = resolve_spec(spec)
    offline = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE") == "1"
    family = model.family or _hub_family(model.location, offline)
    cls = pipeline_class(family)
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if model.kind == "file":
            pipe = cls.from_single_file(model.location, config=config, local_files_only=offline or config is not None,
                                        **kwargs)
        else:
            pipe = cls.from_pretrained(model.location, use_safetensors=True,
                                       local_files_only=offline or model.kind != "hub", **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise _offline_error(spec, e) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def model_family(pipe) -> str:
    """sdxl when the UNet takes SDXL's text/time conditioning, else sd."""
    return "sdxl" if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" else "sd"


def native_resolution(pipe) -> int:
    """Pixel size the model was trained at: UNet sample size times the VAE's downscale factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: VAE factor times the UNet's total downsampling."""
    downs = sum(1 for t in pipe.unet.config.down_block_types) - 1
    return int(pipe.vae_scale_factor) * 2 ** max(downs, 0)
