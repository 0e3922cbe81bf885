"""Plain LoRA (the baseline): y = W0 x + (alpha / r) B (A x), A Kaiming-uniform or Gaussian, B zero."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters.base import AdapterConfig, AdapterLayer, AdapterSet, opt
from engine.adapters.registry import Method, register


@dataclass
class LoRAConfig(AdapterConfig):
    method = "lora"
    init: str = opt("kaiming", "Initialisation of the down matrix A (B starts at zero).",
                    choices=("kaiming", "gaussian"))


def init_down(rows: int, cols: int, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    """A (rows x cols): Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(cols)) or Gaussian with std 1/rows."""
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator) / rows
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


class LoRALayer(AdapterLayer):
    def __init__(self, base: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None):
        super().__init__(base, config, generator)
        r = config.rank
        self.lora_A = nn.Parameter(init_down(r, self.in_features, config.init, generator))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))

    def down_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B

    def native_rank(self) -> int:
        return self.config.rank


class LoRASet(AdapterSet):
    method = "lora"


METHOD = register(Method("lora", "LoRA", LoRAConfig, LoRALayer, LoRASet,
                         "Plain low-rank adapter with a fixed rank: the baseline of every comparison."))
