"""Run folders: their layout, atomic json/jsonl/safetensors writes, checkpoints on disk and read-back helpers."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG, METRICS, RANKS, EVENTS, STATUS = "config.json", "metrics.jsonl", "ranks.jsonl", "events.jsonl", "status.json"
ADAPTER_STATE, ADAPTER_EXTRA = "adapter.safetensors", "adapter.json"
LORA_FILES = {"kohya": "lora_kohya.safetensors", "diffusers": "lora_diffusers.safetensors"}
_CKPT_RE = re.compile(r"^step-(\d+)$")


# --- atomic writes ------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write through a temp file in the same folder, fsync (if durable), then os.replace: readers never see half
    a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, durable: bool = True) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), durable)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically (tensors made contiguous and moved to CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def append_jsonl(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line with a single write (a kill can only tear the last line, which readers skip)."""
    line = json.dumps(row, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a torn or unparsable line (from a kill mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Keep only rows with step <= max_step (rewritten atomically): what a resume from that step will redo."""
    path = Path(path)
    if path.is_file():
        rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
        atomic_write_bytes(path, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())


# --- the folder ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFolder:
    """Paths of one run: config, logs, samples, checkpoints and the final adapter files."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def lora_file(self, fmt: str = "diffusers") -> Path:
        if fmt not in LORA_FILES:
            raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(LORA_FILES)}")
        return self.path / LORA_FILES[fmt]

    def create(self) -> RunFolder:
        for sub in (self.path, self.samples, self.checkpoints):
            sub.mkdir(parents=True, exist_ok=True)
        return self

    def config(self) -> dict[str, Any]:
        if not (self.path / CONFIG).is_file():
            raise ValueError(f"not a run folder (no {CONFIG}): {str(self.path)!r}")
        return json.loads((self.path / CONFIG).read_text())

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATUS).read_text())
        except (OSError, json.JSONDecodeError):
            return {"state": "unknown", "step": 0}

    def write_status(self, state: str, step: int, total_steps: int, **extra: Any) -> None:
        """status.json; "running" updates skip the fsync (many per second would stall training on a slow disk)."""
        atomic_write_json(self.path / STATUS, {"state": state, "step": step, "total_steps": total_steps,
                                               "pid": os.getpid(), "updated": time.time(), **extra},
                          durable=state != "running")

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def ranks(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / RANKS)

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / EVENTS)

    def sample_paths(self) -> list[Path]:
        return sorted(self.samples.glob("*.png")) if self.samples.is_dir() else []

    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first (half-written temp folders are ignored)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _CKPT_RE.match(p.name))
                 and (p / "state.json").is_file()]
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None


def list_runs(root: str | os.PathLike) -> list[RunFolder]:
    """Run folders directly under `root` (those with a config.json), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if (p / CONFIG).is_file()]
    return sorted(runs, key=lambda r: (r / CONFIG).stat().st_mtime, reverse=True)


def new_run_dir(root: str | os.PathLike, label: str) -> Path:
    """A fresh folder name under root: <yyyymmdd-hhmmss>-<label>, suffixed when taken."""
    root = Path(root)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label)}"
    path, n = root / stem, 1
    while path.exists():
        n += 1
        path = root / f"{stem}-{n}"
    return path


# --- checkpoints --------------------------------------------------------------------------------------------
def write_checkpoint(run: RunFolder, step: int, adapter: dict[str, torch.Tensor], optimizer: dict[str, Any],
                     rng: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically (built in a temp folder, then renamed) and keep the newest `keep`."""
    final = run.checkpoints / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=run.checkpoints, prefix=f".tmp-step-{step}-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_STATE))
        save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")  # tensors and plain numbers only: loaded with weights_only
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in run.checkpoint_dirs()[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict, dict, dict]:
    """(adapter tensors, optimizer state, rng tensors, state json) of a checkpoint folder; nothing unpickled."""
    folder = Path(folder)
    adapter = load_file(str(folder / ADAPTER_STATE))
    rng = load_file(str(folder / "rng.safetensors"))
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((folder / "state.json").read_text())
    return adapter, optimizer, rng, state
