"""TrainConfig: every setting of a training run as a dataclass whose fields carry help text, choices and bounds."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.adapters import make_config, method_names

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "bf16_autocast": torch.bfloat16}
# what accelerate is told: bf16 runs the bf16 UNet as it is (no autocast: norms and softmax stay bf16, ~13% faster
# on SDXL); bf16_autocast also runs them in fp32 under autocast; fp16 needs autocast and a loss scaler
AUTOCAST = {"no": "no", "fp16": "fp16", "bf16": "no", "bf16_autocast": "bf16"}
SCHEDULES = ("constant", "linear", "cosine")
STEP_MODES = ("auto", "cuda_graph", "compile", "eager")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI and the studio build their forms from the field metadata."""

    dataset: str = _opt("", "Folder of images with same-name .txt captions or a metadata.jsonl.", group="data")
    base_model: str = _opt("bundled", "Base model: bundled (mini-SD), a hub id, a diffusers folder or a single "
                           ".safetensors file (SD1.x/2.x or SDXL).", group="model")
    method: str = _opt("lora", "Adapter method.", choices=tuple(method_names()), group="method")
    method_settings: dict = _opt({}, "Method settings as JSON, e.g. {\"restart_every_epochs\": 2} (see each "
                                 "method's config help).", group="method")
    rank: int = _opt(16, "Adapter rank (LoRA²: starting/target rank; AC-LoRA, TriLoRA: maximum rank).", min=1,
                     group="method")
    steps: int | None = _opt(300, "Optimizer steps (empty when epochs is set).", min=1, group="schedule")
    epochs: int | None = _opt(None, "Passes over the dataset (instead of steps).", min=1, group="schedule")
    lr: float = _opt(1e-4, "Learning rate of the adapter weights (AdamW).", min=0.0, group="schedule")
    lr_schedule: str = _opt("constant", "Learning-rate schedule after warm-up.", choices=SCHEDULES, group="schedule")
    warmup_steps: int = _opt(0, "Linear warm-up steps.", min=0, group="schedule")
    weight_decay: float = _opt(0.0, "AdamW weight decay of the adapter weights.", min=0.0, group="schedule")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this (0 = no clipping).", min=0.0, group="schedule")
    batch_size: int = _opt(1, "Images per micro-batch (per GPU).", min=1, group="schedule")
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step.", min=1, group="schedule")
    trigger: str = _opt("", "Trigger word put at the front of every caption (empty = none).", group="data")
    repeats: int = _opt(1, "Times each image appears per epoch.", min=1, group="data")
    resolution: int | None = _opt(None, "Training resolution in pixels (empty = the model's native size).", min=8,
                                  group="data")
    buckets: bool = _opt(True, "Aspect-ratio buckets (off: every image centre-cropped to a square).", group="data")
    flip: bool = _opt(False, "Random horizontal flips.", group="data")
    seed: int = _opt(0, "Seed of the adapter init, data order and noise: same seed, same run.", group="run")
    mixed_precision: str = _opt("no", "Frozen weights and activations in fp16/bf16 (adapters stay fp32, their "
                                "gradients accumulate in fp32). bf16: the whole UNet in bf16 (fastest); "
                                "bf16_autocast: norms and softmax in fp32 under autocast; fp16: autocast with a "
                                "loss scaler (GPUs without bf16).", choices=tuple(PRECISIONS), group="run")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass (less memory, slower).",
                                        group="run")
    step_mode: str = _opt("auto", "How each step runs on the GPU: cuda_graph captures the step once per image shape "
                          "and replays it (fewest kernel launches, fastest); compile uses torch.compile on the UNet's "
                          "blocks; eager runs op by op; auto = cuda_graph where it can run (one CUDA GPU, bf16 or "
                          "no mixed precision), else eager. A mode that cannot run falls back to eager with a "
                          "notice.",
                          choices=STEP_MODES, group="run")
    sample_every: int = _opt(0, "Write sample images every N steps (0 = only at the end when prompts are set).",
                             min=0, group="samples")
    sample_prompts: list = _opt([], "Prompts of the sample images.", group="samples")
    sample_steps: int = _opt(20, "Denoising steps of each sample image.", min=1, group="samples")
    rank_every: int = _opt(10, "Log per-layer effective and native ranks every N steps (0 = only at the end).",
                           min=0, group="logging")
    tau: float = _opt(0.9, "Energy fraction that defines the logged effective rank.", min=0.0, max=1.0,
                      group="logging")
    log_every: int = _opt(1, "Fetch losses from the device every N steps (each step still gets a row).", min=1,
                          group="logging")
    checkpoint_every: int = _opt(0, "Write a resumable checkpoint every N steps (0 = only on stop).", min=0,
                                 group="run")
    keep_checkpoints: int = _opt(2, "Checkpoints kept (oldest deleted).", min=1, group="run")
    output_dir: str = _opt("", "Run folder (empty = a new folder under $RANKSTUDIO_RUNS or ./runs).", group="run")

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            self.steps = None  # epochs wins when both are given (the CLI's steps default stays out of the way)
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs (both are empty)")
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if not self.dataset:
            raise ValueError("dataset must name a folder of images, got ''")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution!r}")
        self.adapter_config()  # method settings are validated by the method's own config

    def adapter_config(self):
        return make_config(self.method, **{"rank": self.rank, "seed": self.seed, **self.method_settings})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def field_help(cls) -> dict[str, dict[str, Any]]:
        """Field name -> {default, type, help, choices, min, group}: what the CLI and the studio build forms from."""
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = {"default": default, "type": f.type, **f.metadata}
        return out


def _check_field(f: dataclasses.Field, value: Any) -> None:
    kind = str(f.type)
    if value is None and "None" in kind:
        return
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}
    base = kind.split("|")[0].strip()
    ok = isinstance(value, expected[base]) and (base == "bool" or not isinstance(value, bool))
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{f.name} must be {base}, got {value!r}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    if "min" in f.metadata and value < f.metadata["min"]:
        raise ValueError(f"{f.name} must be >= {f.metadata['min']}, got {value!r}")
    if "max" in f.metadata and value > f.metadata["max"]:
        raise ValueError(f"{f.name} must be <= {f.metadata['max']}, got {value!r}")
    if f.name == "sample_prompts" and not all(isinstance(p, str) for p in value):
        raise ValueError(f"sample_prompts must be a list of strings, got {value!r}")
