"""AC-LoRA (Tian, Ying, Lu 2025): plain LoRA with periodic restarts that keep signal components, reset noise ones."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters.base import AdapterSet, opt
from engine.adapters.lora import LoRAConfig, LoRALayer
from engine.adapters.registry import Method, register


@dataclass
class ACLoRAConfig(LoRAConfig):
    method = "ac_lora"
    restart_every_epochs: int = opt(10, "Restart every E epochs (paper: every 10 of 100). No restart after the last.",
                                    min=1)
    restart_every_steps: int | None = opt(None, "Restart every N optimizer steps instead of every E epochs.", min=1)
    mode: str = opt("product", "Matrix analysed at a restart: product = SVD of dW = BA (recommended); "
                    "paper = SVDs of A and B separately, k = max of the two, then Gaussian noise.",
                    choices=("product", "paper"))
    criterion: str = opt("energy", "Keep rule for threshold p: energy = cumulative s^2 >= p (recommended); "
                         "paper = components while cumsum(s) < p * sum(s) (literal, keeps more on flat tails).",
                         choices=("energy", "paper"))

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.restart_every_epochs, bool) or not isinstance(self.restart_every_epochs, int) \
                or self.restart_every_epochs < 1:
            raise ValueError(f"restart_every_epochs must be a positive integer, got {self.restart_every_epochs!r}")
        if self.restart_every_steps is not None and (not isinstance(self.restart_every_steps, int)
                                                     or self.restart_every_steps < 1):
            raise ValueError(f"restart_every_steps must be a positive integer or empty, got {self.restart_every_steps!r}")


def keep_threshold(mean_loss: float, epoch: int, total_epochs: int) -> float:
    """p = 1 - L ** (epoch / (total_epochs - 1) + 1), clamped to [0, 0.999] (AC-LoRA's restart threshold)."""
    if not math.isfinite(mean_loss) or mean_loss < 0:
        raise ValueError(f"mean loss must be a finite non-negative number, got {mean_loss!r}")
    exponent = epoch / max(total_epochs - 1, 1) + 1
    return min(max(1.0 - mean_loss**exponent, 0.0), 0.999)


def keep_components(S: torch.Tensor, p: float, criterion: str = "energy") -> int:
    """Components kept at threshold p: energy = min k with cumsum(s^2) >= p total; paper = #{i: cumsum(s)_i < p sum s}."""
    S = S.detach().float().cpu()
    if S.numel() == 0 or float(S.sum()) <= 0:
        return 1
    if criterion == "energy":
        frac = S.pow(2).cumsum(0) / S.pow(2).sum()
        k = int((frac < p - 1e-7).sum()) + 1
    elif criterion == "paper":
        k = int((S.cumsum(0) < p * S.sum()).sum())
    else:
        raise ValueError(f"unknown AC-LoRA criterion {criterion!r}; choose energy or paper")
    return max(1, min(k, S.numel()))


def _batched_svd(mats: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD of many matrices, one call per shape."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for n, m in mats.items():
        groups[tuple(m.shape)].append(n)
    out = {}
    for names in groups.values():
        U, S, Vh = torch.linalg.svd(torch.stack([mats[n].float() for n in names]), full_matrices=False)
        out.update({n: (U[i], S[i], Vh[i]) for i, n in enumerate(names)})
    return out


class ACLoRALayer(LoRALayer):
    def __init__(self, base: nn.Module, config: ACLoRAConfig, generator: torch.Generator | None = None):
        super().__init__(base, config, generator)
        self.kept_rank = config.rank  # k of the last restart (the native rank, a step curve)

    def native_rank(self) -> int:
        return self.kept_rank


class ACLoRASet(AdapterSet):
    method = "ac_lora"

    def restart_due(self, epoch: int, total_epochs: int, step: int, total_steps: int, epoch_end: bool) -> bool:
        c = self.config
        if c.restart_every_steps:
            return (step + 1) % c.restart_every_steps == 0 and step + 1 < total_steps
        return epoch_end and (epoch + 1) % c.restart_every_epochs == 0 and epoch < total_epochs - 1

    @torch.no_grad()
    def restart(self, mean_loss: float, epoch: int, total_epochs: int,
                optimizer: torch.optim.Optimizer | None = None) -> dict:
        """RESTART: choose k per layer from threshold p, keep the signal, re-initialise the rest, reset moments."""
        p = keep_threshold(mean_loss, epoch, total_epochs)
        if self.config.mode == "product":
            ranks = self._restart_product(p)
        else:
            ranks = self._restart_paper(p)
        if optimizer is not None:
            for layer in self.layers.values():
                for param in (layer.lora_A, layer.lora_B):
                    optimizer.state.pop(param, None)
        return {"p": p, "mean_loss": mean_loss, "epoch": epoch, "ranks": ranks}

    def _restart_product(self, p: float) -> dict[str, int]:
        spectra = self.spectra()
        ranks = {}
        for name, layer in self.layers.items():
            sp = spectra[name]
            k = keep_components(sp.S, p, self.config.criterion)
            A, B = layer.lora_A, layer.lora_B
            # dW / scale = U (S / scale) V^T; split the root of S between the two factors
            root = (sp.S[:k] / layer.scale).sqrt()
            Vk = sp.V[:, :k]  # (in, k)
            resid = A.float() - (A.float() @ Vk) @ Vk.T  # part of A outside the kept row space
            std = float(resid.std()) if resid.numel() > 1 else 0.0
            std = std if std > 0 else 1.0 / math.sqrt(layer.in_features)
            B.zero_()
            B[:, :k] = (sp.U[:, :k] * root).to(B.dtype)
            A.copy_(torch.randn_like(A) * std)
            A[:k] = (root[:, None] * Vk.T).to(A.dtype)
            layer.kept_rank = k
            ranks[name] = k
        return ranks

    def _restart_paper(self, p: float) -> dict[str, int]:
        svd_a = _batched_svd({n: layer.lora_A for n, layer in self.layers.items()})
        svd_b = _batched_svd({n: layer.lora_B for n, layer in self.layers.items()})
        ranks = {}
        for name, layer in self.layers.items():
            k_a = keep_components(svd_a[name][1], p, self.config.criterion)
            k_b = keep_components(svd_b[name][1], p, self.config.criterion)
            k = max(k_a, k_b)  # union over the matrices of one module
            for param, (U, S, Vh) in ((layer.lora_A, svd_a[name]), (layer.lora_B, svd_b[name])):
                kept = (U[:, :k] * S[:k]) @ Vh[:k]
                std = float((param.float() - kept).std())
                param.copy_((kept + torch.randn_like(kept) * std).to(param.dtype))
            layer.kept_rank = k
            ranks[name] = k
        return ranks

    def extra_state(self) -> dict:
        return {"kept_ranks": {n: layer.kept_rank for n, layer in self.layers.items()}}

    def load_extra_state(self, state: dict) -> None:
        for n, k in state.get("kept_ranks", {}).items():
            if n in self.layers:
                self.layers[n].kept_rank = int(k)


METHOD = register(Method("ac_lora", "AC-LoRA", ACLoRAConfig, ACLoRALayer, ACLoRASet,
                         "LoRA with periodic restarts: SVD keeps the signal components chosen by a loss-driven "
                         "threshold and re-initialises the rest, so each layer settles on its own rank."))
