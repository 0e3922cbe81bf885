"""The pruning slider's numbers: spectra computed once per adapter file and cached, then only rank choice per move."""
from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from engine import analysis
from engine.export import LoraFile, load_lora_file


@dataclass
class PruneSource:
    """A loaded LoRA file with its per-layer spectra and what the file-size estimate needs."""

    lora: LoraFile
    spectra: dict[str, analysis.Spectrum]
    shapes: dict[str, tuple[int, int]]  # layer -> (d out, k in)
    file_bytes: int
    header_bytes: int


@dataclass
class PruneNumbers:
    """Per-layer ranks before/after, parameter counts, file sizes (after: estimated) and the energy kept."""

    layers: list[str]
    before: dict[str, int]
    after: dict[str, int]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    kept_energy: float


def header_size(path: str | Path) -> int:
    """Bytes of a safetensors file's JSON header plus its 8-byte length prefix."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def load_source(path: str | Path) -> PruneSource:
    lora = load_lora_file(path)
    spectra = analysis.batched_spectra(lora.factors)
    shapes = {n: (int(up.shape[0]), int(down.shape[1])) for n, (up, down) in lora.factors.items()}
    return PruneSource(lora, spectra, shapes, Path(path).stat().st_size, header_size(path))


def numbers(src: PruneSource, tau: float, cap: int | None = None) -> PruneNumbers:
    """What pruning to energy fraction `tau` (and an optional rank cap) would give; no file is written."""
    after = analysis.choose_ranks(src.spectra, tau=tau, cap=cap)
    before = src.lora.ranks
    total = sum(float(sp.S.pow(2).sum()) for sp in src.spectra.values())
    kept = sum(float(sp.S[: after[n]].pow(2).sum()) for n, sp in src.spectra.items())
    params_after = analysis.lora_param_count(src.shapes, after)
    alphas = len(before) if src.lora.fmt == "kohya" else 0
    tensors_after = params_after - len(after) + alphas  # lora_param_count counts one alpha per layer
    # the pruned file is fp16 with a header about the size of the original's (ranks and tau metadata added)
    meta_growth = len(json.dumps(after)) - len(json.dumps(before)) + 64
    return PruneNumbers(sorted(before), before, after, analysis.lora_param_count(src.shapes, before), params_after,
                        src.file_bytes, src.header_bytes + meta_growth + 2 * tensors_after,
                        1.0 if total == 0 else kept / total)


class PruneCache:
    """Spectra of the last few adapter files, keyed by path and modification time (thread-safe)."""

    def __init__(self, size: int = 4) -> None:
        self._items: OrderedDict[tuple[str, int], PruneSource] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> PruneSource:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"adapter file not found: {p.name}")
        key = (str(p.resolve()), p.stat().st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        src = load_source(p)
        with self._lock:
            self._items[key] = src
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return src
