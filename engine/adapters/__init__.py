"""Adapter methods (LoRA, AC-LoRA, TriLoRA, LoRA²) over one shared contract, and their injection into a UNet."""
from __future__ import annotations

from engine.adapters import ac_lora, lora, lora2, tri_lora  # noqa: F401  (each registers its method)
from engine.adapters.base import AdapterConfig, AdapterLayer, AdapterSet
from engine.adapters.inject import find_targets, inject, remove
from engine.adapters.registry import get_method, make_config, method_names

__all__ = ["AdapterConfig", "AdapterLayer", "AdapterSet", "find_targets", "get_method", "inject", "make_config",
           "method_names", "remove"]
