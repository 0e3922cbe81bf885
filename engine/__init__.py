"""Adaptive-rank LoRA studio engine: adapters, analysis, files, training and generation (no UI code)."""
from __future__ import annotations

__version__ = "0.1.0"
