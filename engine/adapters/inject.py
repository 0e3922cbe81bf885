"""Put an adapter method on the target layers of a model (a diffusers UNet or any nn.Module), and take it off."""
from __future__ import annotations

import torch
from torch import nn

from engine.adapters.base import AdapterConfig, AdapterLayer, AdapterSet, matches_suffix
from engine.adapters.registry import get_method


def find_targets(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Names of Linear / 1x1-Conv2d modules whose dotted name ends with one of the suffixes, in model order."""
    names = []
    for name, module in model.named_modules():
        if not matches_suffix(name, suffixes):
            continue
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        ):
            names.append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: AdapterConfig, adapter_dtype: torch.dtype = torch.float32) -> AdapterSet:
    """Freeze `model` and wrap every target layer with the config's method; returns the AdapterSet handle.

    Initialisation is seeded by config.seed and independent of the device. Adapter weights are kept in
    `adapter_dtype` (fp32 by default, for training under autocast).
    """
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("this model already carries adapters: remove() them before injecting again")
    method = get_method(config.method)
    names = find_targets(model, config.target_suffixes())
    if not names:
        raise ValueError(f"no layer of the model matches targets {config.targets!r}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(int(config.seed))
    layers: dict[str, AdapterLayer] = {}
    for name in names:
        base = model.get_submodule(name)
        layer = method.layer_cls(base, config, generator)
        device = base.weight.device
        for pname, p in list(layer._parameters.items()):
            layer._parameters[pname] = nn.Parameter(p.data.to(device=device, dtype=adapter_dtype))
        for bname, b in list(layer._buffers.items()):
            if b is not None:
                layer._buffers[bname] = b.to(device=device, dtype=b.dtype if not b.is_floating_point()
                                             else adapter_dtype)
        _set_module(model, name, layer)
        layers[name] = layer
    return method.set_cls(model, config, layers)


def remove(adapters: AdapterSet) -> nn.Module:
    """Unmerge, put every original module back and return the model (its own weights unchanged)."""
    adapters.unmerge()
    adapters.on_remove()
    for name, layer in adapters.layers.items():
        _set_module(adapters.model, name, layer.base)
    adapters.layers = {}
    return adapters.model
