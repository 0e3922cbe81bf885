"""AC-LoRA (Tian, Ying, Lu 2025): plain LoRA with periodic restarts that keep signal components, reset noise ones."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from engine import analysis
from engine.adapters.base import AdapterSet, opt, reset_moments
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
            raise ValueError("restart_every_steps must be a positive integer or empty, "
                             f"got {self.restart_every_steps!r}")


def keep_threshold(mean_loss: float, epoch: int, total_epochs: int) -> float:
    """p = 1 - L ** (epoch / (total_epochs - 1) + 1), clamped to [0, 0.999] (AC-LoRA's restart threshold)."""
    if not math.isfinite(mean_loss) or mean_loss < 0:
        raise ValueError(f"mean loss must be a finite non-negative number, got {mean_loss!r}")
    exponent = epoch / max(total_epochs - 1, 1) + 1
    return min(max(1.0 - mean_loss**exponent, 0.0), 0.999)


def keep_components(S: torch.Tensor, p: float, criterion: str = "energy") -> int:
    """Components kept at threshold p: energy = min k with cumsum(s^2) >= p total;
    paper = #{i: cumsum(s)_i < p sum s}."""
    return int(keep_counts(S.detach().float().cpu()[None], p, criterion)[0])


def keep_counts(S: torch.Tensor, p: float, criterion: str = "energy") -> torch.Tensor:
    """keep_components for a batch of spectra S (n, r), on their device, without a host copy: (n,) counts."""
    S = S.detach().float()
    total = S.sum(-1)
    if criterion == "energy":
        e = S.pow(2)
        frac = e.cumsum(-1) / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        k = (frac < p - 1e-7).sum(-1) + 1
    elif criterion == "paper":
        k = (S.cumsum(-1) < p * total[:, None]).sum(-1)
    else:
        raise ValueError(f"unknown AC-LoRA criterion {criterion!r}; choose energy or paper")
    k = k.clamp(1, max(S.shape[-1], 1))
    return torch.where(total > 0, k, torch.ones_like(k))


def restart_factors(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: torch.Tensor,
                    scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) for a batch of same-shape layers after a restart (pure; shapes: A (n, r, k_in), U (n, d, r'),
    S (n, r'), V (n, k_in, r'), k (n,), scale (n,)).

    The top-k components of dW / scale are split as sqrt(S) into B's first k columns and A's first k rows; A's
    other rows are fresh Gaussian noise with the std of A's part outside the kept row space; B's other columns 0.
    """
    n, r, k_in = A.shape
    rp = S.shape[-1]
    mask = torch.arange(rp, device=S.device) < k[:, None]  # (n, r')
    root = (S / scale[:, None]).clamp_min(0).sqrt() * mask
    Vk = V * mask[:, None, :]
    resid = A - (A @ Vk) @ Vk.transpose(-1, -2)
    std = resid.flatten(1).std(1) if resid[0].numel() > 1 else torch.zeros(n, device=A.device)
    std = torch.where(std > 0, std, torch.full_like(std, 1.0 / math.sqrt(k_in)))
    new_a = torch.randn_like(A) * std[:, None, None]
    kept = root[:, :, None] * Vk.transpose(-1, -2)  # (n, r', k_in)
    new_a[:, :rp] = torch.where(mask[:, :, None], kept, new_a[:, :rp])
    new_b = torch.zeros(n, U.shape[1], r, device=U.device, dtype=U.dtype)
    new_b[:, :, :rp] = U * root[:, None, :]
    return new_a, new_b


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
            reset_moments(optimizer, [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)])
        return {"p": p, "mean_loss": mean_loss, "epoch": epoch, "ranks": ranks}

    def _restart_product(self, p: float) -> dict[str, int]:
        """Batched over same-shape layers: one cheap SVD per group, one host copy of all k, no per-layer sync."""
        groups = analysis.grouped_spectra(self.factors())  # grouped by (B, A) shape: the layers' own groups
        if not groups:
            return {}
        ks = [keep_counts(sp.S, p, self.config.criterion) for _, sp in groups]
        host = torch.cat([k.to(ks[0].device) for k in ks]).tolist()  # the one sync
        ranks = dict(zip([n for names, _ in groups for n in names], map(int, host), strict=True))
        for (names, sp), k in zip(groups, ks, strict=True):
            layers = [self.layers[n] for n in names]
            scales = torch.tensor([layer.scale for layer in layers], device=sp.S.device)
            new_a, new_b = restart_factors(torch.stack([layer.lora_A.detach().float() for layer in layers]),
                                           sp.U, sp.S, sp.V, k, scales)
            torch._foreach_copy_([layer.lora_A for layer in layers] + [layer.lora_B for layer in layers],
                                 list(new_a.unbind(0)) + list(new_b.unbind(0)))
            for n, layer in zip(names, layers, strict=True):
                layer.kept_rank = ranks[n]
        return {n: ranks[n] for n in self.layers}

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
