"""Standard LoRA files: kohya/A1111/ComfyUI and diffusers/PEFT safetensors, per-layer ranks, metadata, safe loading."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import analysis

FORMATS = ("kohya", "diffusers")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_KOHYA_RE = re.compile(r"^(lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_RE = re.compile(r"^((?:unet|text_encoder|text_encoder_2)\.[A-Za-z0-9_.]+)\.(lora_A|lora_B)\.weight$")


class LoraFileError(ValueError):
    """A LoRA file that cannot be read: the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{Path(path).name}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass
class ExportResult:
    path: str
    fmt: str
    ranks: dict[str, int]
    kept_energy: float
    n_params: int
    bytes: int


@dataclass
class LoraFile:
    """A LoRA file as plain factors: {module key: (up d x r, down r x k)} with alpha / r folded into up."""

    path: str
    fmt: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    conv: set[str] = field(default_factory=set)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: int(down.shape[0]) for k, (_, down) in self.factors.items()}


# --- names -------------------------------------------------------------------------------------------------
def is_sdxl(unet_config: Any) -> bool:
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    return get("addition_embed_type", None) == "text_time"


def _layers_per_block(unet_config: Any) -> int:
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    lpb = get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ValueError(f"SGM names need one layers_per_block for every block, got {lpb}")
        lpb = lpb[0]
    return int(lpb)


def to_sgm(name: str, layers_per_block: int) -> str:
    """diffusers UNet module name -> the SGM (original SDXL) name sd-scripts writes (inverse of diffusers' map)."""
    n = layers_per_block + 1
    parts = name.split(".")
    if len(parts) < 4:
        return name
    if parts[0] == "down_blocks" and parts[2] in ("attentions", "resnets"):
        b, kind, j = int(parts[1]), parts[2], int(parts[3])
        head = ["input_blocks", str(b * n + j + 1), "1" if kind == "attentions" else "0"]
        rest = parts[4:]
    elif parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        head = ["middle_block", "1" if kind == "attentions" else str(2 * j)]
        rest = parts[3:]
    elif parts[0] == "up_blocks" and parts[2] in ("attentions", "resnets"):
        b, kind, j = int(parts[1]), parts[2], int(parts[3])
        head = ["output_blocks", str(b * n + j), "1" if kind == "attentions" else "0"]
        rest = parts[4:]
    else:
        return name
    rest = ["skip_connection" if p == "conv_shortcut" else p for p in rest]
    return ".".join(head + rest)


def kohya_key(module: str, unet_config: Any | None) -> str:
    """Module name in the UNet -> kohya stem lora_unet_<path with _>, SGM block names for SDXL."""
    if unet_config is not None and is_sdxl(unet_config):
        module = to_sgm(module, _layers_per_block(unet_config))
    return "lora_unet_" + module.replace(".", "_")


def kohya_table(module_names: list[str], unet_config: Any | None) -> dict[str, str]:
    """kohya stem -> module name for a model's modules (the inverse of kohya_key)."""
    return {kohya_key(m, unet_config): m for m in module_names}


# --- save --------------------------------------------------------------------------------------------------
def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_target(path: str | os.PathLike, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"{p.name}: LoRA files are written as .safetensors, not {p.suffix or 'no suffix'!r}")
    return p


def save_lora(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    fmt: str = "kohya",
    *,
    unet_config: Any | None = None,
    conv: set[str] | frozenset[str] = frozenset(),
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> ExportResult:
    """Write plain LoRA factors {module: (up, down)} (scales folded, so alpha = rank per layer) atomically."""
    p = _check_target(path, fmt)
    tensors: dict[str, torch.Tensor] = {}
    ranks = {m: int(down.shape[0]) for m, (_, down) in factors.items()}
    alpha = kohya_alpha(ranks)
    for module, (up, down) in factors.items():
        r = ranks[module]
        analysis.check_rank(r, what=f"rank of {module}")
        if fmt == "kohya":
            up = up * (r / alpha)  # the file's alpha / r scale undoes this
        up4, down4 = up.detach().to("cpu", dtype).contiguous(), down.detach().to("cpu", dtype).contiguous()
        if module in conv:
            up4, down4 = up4[:, :, None, None].contiguous(), down4[:, :, None, None].contiguous()
        if fmt == "kohya":
            stem = kohya_key(module, unet_config)
            tensors[f"{stem}.lora_down.weight"] = down4
            tensors[f"{stem}.lora_up.weight"] = up4
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
        else:
            tensors[f"unet.{module}.lora_A.weight"] = down4
            tensors[f"unet.{module}.lora_B.weight"] = up4
    if not tensors:
        raise ValueError("nothing to export: the adapter has no layers")
    meta = _metadata(ranks, fmt, unet_config, metadata or {})
    _atomic_save(tensors, p, meta)
    n_params = sum(t.numel() for t in tensors.values())
    return ExportResult(str(p), fmt, ranks, float(metadata.get("kept_energy", 1.0)) if metadata else 1.0, n_params,
                        p.stat().st_size)


def kohya_alpha(ranks: dict[str, int]) -> float:
    """One alpha for every module of a kohya file: the most common rank.

    METHODS.md folds every scale into the weights (alpha = r per layer). With per-layer ranks that means
    per-layer alphas, which diffusers 0.42 applies wrongly to kohya files (its alpha_pattern keys keep a
    "unet." prefix and never match, so every module gets the most common alpha). A single alpha with the
    up weights scaled by r / alpha is read identically by diffusers, A1111 and ComfyUI.
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    return float(max(sorted(counts), key=lambda r: counts[r]))


def _metadata(ranks: dict[str, int], fmt: str, unet_config: Any | None, extra: dict[str, Any]) -> dict[str, str]:
    distinct = set(ranks.values())
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(distinct.pop()) if len(distinct) == 1 else "Dynamic",
        "ss_network_alpha": str(kohya_alpha(ranks)),
        "ss_base_model_version": ("sdxl_base_v1-0" if unet_config is not None and is_sdxl(unet_config) else "sd_v1"),
        "rankstudio.format": fmt,
        "rankstudio.ranks": json.dumps(ranks),
    }
    for k, v in extra.items():
        meta[f"rankstudio.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def export_lora(
    adapters,
    path: str | os.PathLike,
    fmt: str = "kohya",
    *,
    unet_config: Any | None = None,
    tau: float | None = None,
    rank: int | None = None,
    cap: int | None = None,
    criterion: str = "energy",
    value: float | None = None,
    kohya_compat: bool = False,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> ExportResult:
    """Export an AdapterSet of any method as a plain per-layer-rank LoRA file (optionally pruned by tau/rank/cap).

    Every input is validated before anything is written.
    """
    _check_target(path, fmt)
    if tau is not None:
        analysis.check_tau(tau)
    if rank is not None:
        analysis.check_rank(rank)
    if cap is not None:
        analysis.check_rank(cap, what="rank cap")
    if unet_config is None:
        unet_config = getattr(adapters.model, "config", None)
    factors, ranks, kept = adapters.to_lora(tau=tau, rank=rank, cap=cap, criterion=criterion, value=value,
                                            kohya_compat=kohya_compat)
    conv = {n for n, layer in adapters.layers.items() if layer.is_conv}
    meta = {"method": adapters.method, "adapter_config": adapters.config.to_dict(), "kept_energy": kept,
            "tau": tau if tau is not None else "none", **(metadata or {})}
    if adapters.method == "ac_lora" or adapters.method == "lora2":
        meta["native_ranks"] = adapters.native_ranks()
    res = save_lora(factors, path, fmt, unet_config=unet_config, conv=conv, metadata=meta, dtype=dtype)
    res.kept_energy = kept
    return res


# --- load --------------------------------------------------------------------------------------------------
def load_lora_file(path: str | os.PathLike, *, module_names: list[str] | None = None,
                   unet_config: Any | None = None) -> LoraFile:
    """Read a kohya or diffusers LoRA safetensors file (never a pickle); errors name the file and the problem.

    With `module_names` (the UNet's module names) kohya stems are mapped back to module names.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(p, f"{p.suffix} files are pickles and can run code when loaded; only .safetensors "
                               "LoRA files are accepted (convert it to safetensors first)")
    if p.suffix.lower() != ".safetensors":
        raise LoraFileError(p, f"not a .safetensors file (suffix {p.suffix or 'none'!r})")
    if not p.is_file():
        raise LoraFileError(p, "file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise LoraFileError(p, f"not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated "
                               "or not a safetensors file at all") from None
    if not tensors:
        raise LoraFileError(p, "the file holds no tensors")
    kohya = {k: _KOHYA_RE.match(k) for k in tensors}
    peft = {k: _PEFT_RE.match(k) for k in tensors}
    if all(kohya.values()):
        fmt, parts = "kohya", {k: (m.group(1), m.group(2)) for k, m in kohya.items()}
        down_key, up_key = "lora_down.weight", "lora_up.weight"
    elif all(peft.values()):
        fmt, parts = "diffusers", {k: (m.group(1), m.group(2)) for k, m in peft.items()}
        down_key, up_key = "lora_A", "lora_B"
    else:
        foreign = [k for k in tensors if not (kohya[k] or peft[k])] or list(tensors)
        raise LoraFileError(p, f"keys that are not LoRA weights of a known format, e.g. {foreign[:3]}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, (stem, kind) in parts.items():
        modules.setdefault(stem, {})[kind] = tensors[key]
    factors, conv = {}, set()
    table = kohya_table(module_names, unet_config) if module_names is not None and fmt == "kohya" else {}
    for stem, t in modules.items():
        if down_key not in t or up_key not in t:
            raise LoraFileError(p, f"{stem} lacks its {'down' if down_key not in t else 'up'} weight")
        down, up = t[down_key], t[up_key]
        if down.dim() == 4:
            conv.add(stem)
            down, up = down.flatten(1), up.flatten(1)
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(p, f"{stem}: shapes {tuple(up.shape)} (up) and {tuple(down.shape)} (down) do not "
                                   "form a low-rank pair")
        r = down.shape[0]
        alpha = float(t["alpha"]) if "alpha" in t else float(r)
        name = stem
        if fmt == "diffusers":
            name = stem.split(".", 1)[1] if stem.startswith("unet.") else stem
        else:
            name = table.get(stem, stem)
        factors[name] = (up.float() * (alpha / r), down.float())
        if stem in conv:
            conv.discard(stem)
            conv.add(name)
    return LoraFile(str(p), fmt, factors, conv, metadata)


def prune_file(lora: LoraFile, path: str | os.PathLike, fmt: str | None = None, *, tau: float | None = None,
               rank: int | None = None, cap: int | None = None, criterion: str = "energy", value: float | None = None,
               kohya_compat: bool = False, unet_config: Any | None = None,
               dtype: torch.dtype = torch.float16) -> ExportResult:
    """Truncate a loaded LoRA file's layers (energy tau, fixed rank, kohya criteria) and write the result."""
    fmt = fmt or lora.fmt
    _check_target(path, fmt)
    if tau is not None:
        analysis.check_tau(tau)
    factors, ranks, kept = analysis.truncate_all(lora.factors, tau=tau, rank=rank, cap=cap, criterion=criterion,
                                                 value=value, kohya_compat=kohya_compat)
    meta = {k.removeprefix("rankstudio."): v for k, v in lora.metadata.items() if k.startswith("rankstudio.")
            and k not in ("rankstudio.ranks", "rankstudio.format")}
    meta.update({"tau": tau if tau is not None else "none", "kept_energy": kept, "pruned_from": Path(lora.path).name})
    if fmt == "kohya" and lora.fmt == "kohya":
        # keys are already kohya stems: write them back unchanged
        res = _save_stems(factors, path, lora.conv, meta, dtype)
    else:
        res = save_lora(factors, path, fmt, unet_config=unet_config, conv=lora.conv, metadata=meta, dtype=dtype)
    res.kept_energy = kept
    return res


def _save_stems(factors, path, conv, meta, dtype) -> ExportResult:
    tensors = {}
    ranks = {s: int(d.shape[0]) for s, (_, d) in factors.items()}
    alpha = kohya_alpha(ranks)
    for stem, (up, down) in factors.items():
        r = ranks[stem]
        up, down = (up * (r / alpha)).to("cpu", dtype).contiguous(), down.to("cpu", dtype).contiguous()
        if stem in conv:
            up, down = up[:, :, None, None].contiguous(), down[:, :, None, None].contiguous()
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    p = Path(path)
    _atomic_save(tensors, p, _metadata(ranks, "kohya", None, meta))
    return ExportResult(str(p), "kohya", ranks, 1.0, sum(t.numel() for t in tensors.values()), p.stat().st_size)
