"""TriLoRA (Feng, He et al. 2024): dW = U diag(sigma) V^T with all three factors trainable."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters.base import AdapterConfig, AdapterLayer, AdapterSet, opt
from engine.adapters.registry import Method, register


@dataclass
class TriLoRAConfig(AdapterConfig):
    method = "tri_lora"
    sigma_init: str = opt("one", "Initial sigma: one = all ones (recommended); w0 = the top-R singular values of "
                          "the frozen weight divided by the largest (the paper's SVD initialisation).",
                          choices=("one", "w0"))

    def __post_init__(self):
        if self.sigma_init in ("zero", 0, "0"):
            raise ValueError("sigma_init='zero' is invalid: with V^T = 0 at init no gradient would ever flow")
        super().__post_init__()


def w0_sigma(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` singular values of W0 over the largest; padded with the smallest kept value if rank > min(d, k)."""
    s = torch.linalg.svdvals(weight.detach().float().reshape(weight.shape[0], -1).cpu())
    s = s / s[0].clamp_min(1e-12)
    s = s[:rank].clamp_min(1e-3)
    if s.numel() < rank:
        s = torch.cat([s, s[-1:].expand(rank - s.numel())])
    return s


class TriLoRALayer(AdapterLayer):
    def __init__(self, base: nn.Module, config: TriLoRAConfig, generator: torch.Generator | None = None):
        super().__init__(base, config, generator)
        R = config.rank
        self.tri_U = nn.Parameter(torch.randn(self.out_features, R, generator=generator) / R)
        self.tri_Vt = nn.Parameter(torch.zeros(R, self.in_features))
        sigma = w0_sigma(base.weight, R) if config.sigma_init == "w0" else torch.ones(R)
        self.tri_sigma = nn.Parameter(sigma)

    def down_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tri_Vt, self.tri_U

    def vector(self) -> torch.Tensor:
        return self.tri_sigma

    @torch.no_grad()
    def native_rank(self) -> int:
        """Components with |sigma_i| ||U_i|| ||V_i|| above 1% of the largest (0 while the update is zero)."""
        return int(component_counts(self.tri_sigma[None], self.tri_U[None], self.tri_Vt[None])[0])


    def export_rank(self) -> int:
        return self.config.rank  # every component; prune with tau to drop the small ones


def component_counts(sigma: torch.Tensor, U: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    """Per layer of a batch (sigma (n, R), U (n, d, R), Vt (n, R, k)): how many components have
    |sigma_i| ||U_i|| ||V_i|| above 1% of the layer's largest (0 while the update is zero)."""
    w = sigma.abs() * U.norm(dim=1) * Vt.norm(dim=2)  # (n, R)
    top = w.amax(1, keepdim=True)
    return ((w > 0.01 * top) & (top > 0)).sum(1)


class TriLoRASet(AdapterSet):
    method = "tri_lora"
    folds_vectors = True

    @torch.no_grad()
    def device_native_ranks(self) -> torch.Tensor | None:
        """Every layer's component count in a few batched ops per shape group (not one sync per layer)."""
        layers = list(self.layers.values())
        if not layers:
            return None
        device = layers[0].tri_U.device
        if getattr(self, "_native_groups", (None,))[0] != device:  # made once: no host-to-device copy per call
            groups: dict[tuple, list[int]] = {}
            for i, layer in enumerate(layers):
                groups.setdefault((tuple(layer.tri_U.shape), tuple(layer.tri_Vt.shape)), []).append(i)
            order = [i for ix in groups.values() for i in ix]
            self._native_groups = (device, list(groups.values()), torch.tensor(order, device=device))
        _, groups, order = self._native_groups
        flat = torch.cat([component_counts(torch.stack([layers[i].tri_sigma for i in ix]),
                                           torch.stack([layers[i].tri_U for i in ix]),
                                           torch.stack([layers[i].tri_Vt for i in ix])) for ix in groups])
        return torch.empty_like(flat).index_copy_(0, order, flat)


METHOD = register(Method("tri_lora", "TriLoRA", TriLoRAConfig, TriLoRALayer, TriLoRASet,
                         "SVD-shaped adapter U diag(sigma) V^T: the singular values are learned directly."))
